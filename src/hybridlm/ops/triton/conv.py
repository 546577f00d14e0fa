"""Fused depthwise causal conv1d (+ SiLU) in Triton: forward, backward, and a one-token decode step.

Same function as `hybridlm.ops.conv.causal_conv1d` (the reference beside it): for each channel c,
    z[t] = sum_j weight[c, j] * x_ext[t - (W-1) + j],   y = silu(z) (or z)
where x_ext is the sequence preceded by its W-1 context inputs (zeros, or the cached `initial_state`),
and with packed documents (`cu_seqlens`) each document starts from its own context.

One kernel pass reads each input W times from cache instead of materialising the padded stream,
and applies SiLU in registers. The backward recomputes z (no activation saved): one pass gives
dz = dy * silu'(z) (float32) and dweight, a second gives dx from W shifted reads of dz. The
document of every token comes from cu_seqlens on the device: no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Measured on an H200 (docs/benchmarks.md, short conv): the forward and the dx pass at 32 x 128.
BLOCK_T = 32
BLOCK_C = 128
NUM_WARPS = 4
# The backward's dz pass: each program sums its dweight products over DZ_ROW_BLOCKS row blocks.
DZ_BLOCK_T = 16
DZ_BLOCK_C = 64
DZ_ROW_BLOCKS = 16
DZ_NUM_WARPS = 4


@triton.jit
def _row_bounds(rows, m_r, seq_idx, cu_seqlens, seq_len, VARLEN: tl.constexpr):
    if VARLEN:
        doc = tl.load(seq_idx + rows, mask=m_r, other=0)
        start = tl.load(cu_seqlens + doc, mask=m_r, other=0)
        end = tl.load(cu_seqlens + doc + 1, mask=m_r, other=0)
    else:
        doc = rows // seq_len
        start = doc * seq_len
        end = start + seq_len
    return doc, start, end


@triton.jit
def _load_tap(x, init, src, start, doc, m_rc, cols, C, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """x_ext at token positions src [BT] for channels cols [BC] (float32): x, the context, or 0."""
    inside = src >= start
    val = tl.load(x + src[:, None] * C + cols[None, :], mask=m_rc & inside[:, None], other=0.0).to(tl.float32)
    if HAS_INIT:
        pos = (W - 1) + (src - start)
        ctx = tl.load(
            init + (doc[:, None] * C + cols[None, :]) * (W - 1) + pos[:, None],
            mask=m_rc & (src < start)[:, None],
            other=0.0,
        ).to(tl.float32)
        val += ctx
    return val


@triton.jit
def _conv_fwd_kernel(
    x, weight, init, y, seq_idx, cu_seqlens,
    num_tokens, seq_len, C,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r = rows < num_tokens
    m_c = cols < C
    m_rc = m_r[:, None] & m_c[None, :]
    doc, start, _ = _row_bounds(rows, m_r, seq_idx, cu_seqlens, seq_len, VARLEN)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):
        tap = _load_tap(x, init, rows - (W - 1) + j, start, doc, m_rc, cols, C, W, HAS_INIT)
        acc += tap * tl.load(weight + cols * W + j, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + rows[:, None] * C + cols[None, :], acc.to(y.dtype.element_ty), mask=m_rc)


@triton.jit
def _load_taps(x, init, rows, start, doc, m_r, cols, m_c, C, W: tl.constexpr, WP: tl.constexpr, HAS_INIT: tl.constexpr):
    """The W inputs each output row reads, x_ext[rows - (W-1) + j], as [BT, WP, BC] float32 (WP >= W; 0 past W)."""
    taps = tl.arange(0, WP)
    src = rows[:, None] - (W - 1) + taps[None, :]  # [BT, WP]
    inside = src >= start[:, None]
    m = (m_r[:, None] & (taps < W)[None, :])[:, :, None] & m_c[None, None, :]
    val = tl.load(x + src[:, :, None] * C + cols[None, None, :], mask=m & inside[:, :, None], other=0.0).to(tl.float32)
    if HAS_INIT:
        pos = (W - 1) + (src - start[:, None])
        ctx = tl.load(
            init + (doc[:, None, None] * C + cols[None, None, :]) * (W - 1) + pos[:, :, None],
            mask=m & (src < start[:, None])[:, :, None],
            other=0.0,
        ).to(tl.float32)
        val += ctx
    return val


@triton.jit
def _conv_dz_kernel(
    x, weight, init, dy, dz, dw_partial, seq_idx, cu_seqlens,
    num_tokens, seq_len, C,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
):
    """dz = dy * silu'(z) (z recomputed), stored in float32, and the part of dweight from this
    program's ROW_BLOCKS row blocks: dweight[c, j] = sum_t dz[t, c] x_ext[t-(W-1)+j, c], written to
    dw_partial [num_programs, C, W]. The products are summed over rows once, at the end."""
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = cols < C
    taps = tl.arange(0, WP)
    w = tl.load(weight + cols[None, :] * W + taps[:, None], mask=(taps < W)[:, None] & m_c[None, :], other=0.0)
    w = w.to(tl.float32)  # [WP, BC]
    acc = tl.zeros([BT, WP, BC], dtype=tl.float32)
    for i in range(ROW_BLOCKS):
        rows = (pid_t * ROW_BLOCKS + i).to(tl.int64) * BT + tl.arange(0, BT)
        m_r = rows < num_tokens
        m_rc = m_r[:, None] & m_c[None, :]
        doc, start, _ = _row_bounds(rows, m_r, seq_idx, cu_seqlens, seq_len, VARLEN)
        xs = _load_taps(x, init, rows, start, doc, m_r, cols, m_c, C, W, WP, HAS_INIT)
        offsets = rows[:, None] * C + cols[None, :]
        grad = tl.load(dy + offsets, mask=m_rc, other=0.0).to(tl.float32)
        if SILU:
            z = tl.sum(xs * w[None, :, :], 1)
            sig = tl.sigmoid(z)
            grad = grad * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz + offsets, grad, mask=m_rc)
        acc += grad[:, None, :] * xs
    dw = tl.sum(acc, 0)  # [WP, BC]
    tl.store(dw_partial + (pid_t * C + cols[None, :]) * W + taps[:, None], dw, mask=(taps < W)[:, None] & m_c[None, :])


@triton.jit
def _conv_dx_kernel(
    dz, weight, dx, seq_idx, cu_seqlens,
    num_tokens, seq_len, C,
    W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, VARLEN: tl.constexpr,
):
    """dx[t] = sum_s weight[W-1-s] dz[t+s], over the later tokens t+s of t's own document."""
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_r = rows < num_tokens
    m_c = cols < C
    _, _, end = _row_bounds(rows, m_r, seq_idx, cu_seqlens, seq_len, VARLEN)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        later = rows + s
        m_later = (m_r & (later < end))[:, None] & m_c[None, :]
        grad = tl.load(dz + later[:, None] * C + cols[None, :], mask=m_later, other=0.0)
        acc += grad * tl.load(weight + cols * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + rows[:, None] * C + cols[None, :], acc.to(dx.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@triton.jit
def _conv_final_state_kernel(
    x, init, final, cu_seqlens, C,
    W: tl.constexpr, BC: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """final[n, c, p] = x_ext at position end_n - (W-1) + p: the context a continuation needs."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = cols < C
    start = tl.load(cu_seqlens + n)
    end = tl.load(cu_seqlens + n + 1)
    for p in tl.static_range(W - 1):
        # A vector of the one position (masks must be tensors, not scalars, in the interpreter).
        src = (end - (W - 1) + p + tl.zeros([BC], dtype=tl.int32)).to(tl.int64)
        inside = src >= start
        val = tl.load(x + src * C + cols, mask=m_c & inside, other=0.0)
        if HAS_INIT:
            ctx = tl.load(init + (n * C + cols) * (W - 1) + (W - 1) + (src - start), mask=m_c & (src < start), other=0.0)
            val = tl.where(inside, val, ctx.to(val.dtype))
        tl.store(final + (n * C + cols) * (W - 1) + p, val.to(final.dtype.element_ty), mask=m_c)


@triton.jit
def _conv_update_kernel(
    x, weight, state, y, C,
    W: tl.constexpr, BC: tl.constexpr, SILU: tl.constexpr,
):
    """One decoding step: y = act(sum_j w[j] [state, x][j]); state <- [state[1:], x] in place."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m_c = cols < C
    xv = tl.load(x + b * C + cols, mask=m_c, other=0.0)
    acc = xv.to(tl.float32) * tl.load(weight + cols * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)
    base = state + (b * C + cols) * (W - 1)
    prev = tl.load(base, mask=m_c, other=0.0)
    acc += prev.to(tl.float32) * tl.load(weight + cols * W, mask=m_c, other=0.0).to(tl.float32)
    for p in tl.static_range(1, W - 1):
        cur = tl.load(base + p, mask=m_c, other=0.0)
        acc += cur.to(tl.float32) * tl.load(weight + cols * W + p, mask=m_c, other=0.0).to(tl.float32)
        tl.store(base + p - 1, cur, mask=m_c)
    tl.store(base + (W - 2), xv.to(state.dtype.element_ty), mask=m_c)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + b * C + cols, acc.to(y.dtype.element_ty), mask=m_c)


def _seq_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    tokens = torch.arange(num_tokens, device=cu_seqlens.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True).to(torch.int32)


def _prepare(x, weight, initial_state, cu_seqlens):
    batch, seq_len, channels = x.shape
    weight = weight.reshape(channels, -1).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(device=x.device, dtype=torch.int32)
    seq_idx = None if cu is None else _seq_index(cu, batch * seq_len)
    init = None if initial_state is None else initial_state.to(x.dtype).contiguous()
    return x.contiguous(), weight, init, cu, seq_idx


@torch.library.custom_op("hybridlm::causal_conv1d", mutates_args=())
def _causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    silu: bool,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, channels = x.shape
    x, w, init, cu, seq_idx = _prepare(x, weight, initial_state, cu_seqlens)
    width = w.shape[1]
    y = torch.empty_like(x)
    grid = (triton.cdiv(batch * seq_len, BLOCK_T), triton.cdiv(channels, BLOCK_C))
    _conv_fwd_kernel[grid](
        x, w, init, y, seq_idx, cu,
        batch * seq_len, seq_len, channels,
        W=width, BT=BLOCK_T, BC=BLOCK_C, VARLEN=cu is not None, HAS_INIT=init is not None, SILU=silu,
        num_warps=NUM_WARPS,
    )
    if not output_final_state:
        return y, x.new_empty(0)
    if cu is None:
        cu = torch.arange(batch + 1, device=x.device, dtype=torch.int32) * seq_len
    final = x.new_empty(cu.shape[0] - 1, channels, width - 1)
    _conv_final_state_kernel[(cu.shape[0] - 1, triton.cdiv(channels, BLOCK_C))](
        x, init, final, cu, channels, W=width, BC=BLOCK_C, HAS_INIT=init is not None,
    )
    return y, final


@_causal_conv1d.register_fake
def _(x, weight, initial_state, cu_seqlens, silu, output_final_state):
    if not output_final_state:
        return torch.empty_like(x), x.new_empty(0)
    num_seqs = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(num_seqs, x.shape[2], weight.shape[-1] - 1)


@torch.library.custom_op("hybridlm::causal_conv1d_backward", mutates_args=())
def _causal_conv1d_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dy: torch.Tensor,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, channels = x.shape
    x, w, init, cu, seq_idx = _prepare(x, weight, initial_state, cu_seqlens)
    width = w.shape[1]
    dz = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    programs = triton.cdiv(batch * seq_len, DZ_BLOCK_T * DZ_ROW_BLOCKS)
    dw_partial = x.new_empty(programs, channels, width, dtype=torch.float32)
    _conv_dz_kernel[(programs, triton.cdiv(channels, DZ_BLOCK_C))](
        x, w, init, dy.contiguous(), dz, dw_partial, seq_idx, cu,
        batch * seq_len, seq_len, channels,
        W=width, WP=triton.next_power_of_2(width), BT=DZ_BLOCK_T, BC=DZ_BLOCK_C, ROW_BLOCKS=DZ_ROW_BLOCKS,
        VARLEN=cu is not None, HAS_INIT=init is not None, SILU=silu, num_warps=DZ_NUM_WARPS,
    )
    dx = torch.empty_like(x)
    grid = (triton.cdiv(batch * seq_len, BLOCK_T), triton.cdiv(channels, BLOCK_C))
    _conv_dx_kernel[grid](
        dz, w, dx, seq_idx, cu, batch * seq_len, seq_len, channels,
        W=width, BT=BLOCK_T, BC=BLOCK_C, VARLEN=cu is not None, num_warps=NUM_WARPS,
    )
    return dx, dw_partial.sum(0).to(weight.dtype).view(weight.shape)


@_causal_conv1d_backward.register_fake
def _(x, weight, initial_state, cu_seqlens, dy, silu):
    return torch.empty_like(x), torch.empty_like(weight)


def _conv_setup(ctx, inputs, output):
    x, weight, initial_state, cu_seqlens, silu, _ = inputs
    ctx.save_for_backward(x, weight, initial_state, cu_seqlens)
    ctx.silu = silu


def _conv_autograd(ctx, dy, dfinal):
    x, weight, initial_state, cu_seqlens = ctx.saved_tensors
    dx, dw = _causal_conv1d_backward(x, weight, initial_state, cu_seqlens, dy, ctx.silu)
    return dx, dw, None, None, None, None


_causal_conv1d.register_autograd(_conv_autograd, setup_context=_conv_setup)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton `causal_conv1d`; arguments and results as `hybridlm.ops.conv.causal_conv1d`.

    x: [B, T, C]; weight: [C, W] or [C, 1, W]; initial_state: [N, C, W-1] (not differentiated:
    gradients flow to x and weight only); cu_seqlens: [N+1] (B == 1). Returns (y [B, T, C] in x's
    dtype, final state [N, C, W-1] or None).
    """
    if initial_state is not None and initial_state.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "causal_conv1d_triton does not differentiate initial_state; detach it or use the PyTorch "
            "path (hybridlm.ops.conv.causal_conv1d on CPU tensors)"
        )
    y, final = _causal_conv1d(x, weight, initial_state, cu_seqlens, activation == "silu", output_final_state)
    return y, (final if output_final_state else None)


def causal_conv1d_update_(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, *, activation: str | None = "silu"
) -> torch.Tensor:
    """One decoding step for a batch: x [B, 1, C] or [B, C]; state [B, C, W-1] updated in place.

    Returns y with x's shape. Equal to causal_conv1d(x, weight, initial_state=state,
    output_final_state=True) followed by state.copy_(final), without the extra tensors.
    """
    channels = x.shape[-1]
    batch = x.shape[0]
    if state.shape != (batch, channels, weight.shape[-1] - 1) or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous [B, C, W-1] = {(batch, channels, weight.shape[-1] - 1)} tensor; "
            f"got {tuple(state.shape)} (contiguous={state.is_contiguous()})"
        )
    w = weight.reshape(channels, -1).contiguous()
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _conv_update_kernel[(batch, triton.cdiv(channels, BLOCK_C))](
        xc, w, state, y, channels, W=w.shape[1], BC=BLOCK_C, SILU=activation == "silu"
    )
    return y
