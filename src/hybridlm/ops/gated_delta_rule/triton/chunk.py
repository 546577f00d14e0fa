"""Host side of the Triton gated delta rule: launches, buffers, autograd, torch.library custom ops.

`chunk_gated_delta_rule_triton` is the training/prefill path (chunked, with a backward by
recomputation: the backward reruns the forward's prepare and state passes instead of keeping the
per-chunk states alive between forward and backward). `recurrent_gated_delta_rule_triton` is the
decoding path (one or a few tokens, forward only, state updated in place if asked).

Both are wrapped as torch.library custom ops (`hybridlm::gdn_chunk`, `hybridlm::gdn_recurrent`) so
torch.compile treats them as opaque calls with known output shapes instead of tracing into Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from hybridlm.ops.gated_delta_rule.triton import kernels
from hybridlm.ops.gated_delta_rule.triton.layout import CHUNK, SequenceLayout, sequence_layout


@dataclass
class KernelOptions:
    """Tuning and precision knobs (module-wide; benchmarks may change them, models should not).

    low_precision_buffers: names of the intermediate buffers stored in the input dtype (bf16 for
        bf16 inputs) instead of float32: any of "w" (W), "k" (Kd, Qd), "u" (U), "delta" (Delta,
        dDelta), "states" (chunk-entry states and their gradients).
    bf16_state_dots / bf16_dots: bf16 operands for the matmuls of the two sequential state passes /
        of the parallel kernels (else float32 operands at state_precision / dot_precision).
    dot_precision, state_precision, inverse_precision: matrix-unit precision of float32 matmuls in
        the parallel kernels, the state passes and the UT transform: "tf32" (10-bit mantissas,
        truncated), "tf32x3" (about float32 accuracy, three passes) or "ieee" (FMA, slow).
    state_block_v: V tile of the two sequential kernels (0: chosen from the number of programs).
    grad_block_v: V tile of the gradient kernel's loop. warps_*, stages_state: launch settings.

    The defaults keep every error under 5e-3 against float64 with bf16 inputs (docs/benchmarks.md);
    bf16 buffers and matmuls (fla's choice) are about twice as fast and reach 1e-2.
    """

    low_precision_buffers: tuple[str, ...] = ("w",)
    bf16_state_dots: bool = False
    bf16_dots: bool = False
    dot_precision: str = "tf32"
    state_precision: str = "tf32"
    inverse_precision: str = "tf32x3"
    state_block_v: int = 0
    grad_block_v: int = 32
    # 4 warps: with 8, Triton 3.6 on an H200 made _state_bwd_kernel access memory out of bounds
    # (the same inputs run correctly with 4); see docs/benchmarks.md.
    warps_prepare: int = 4
    warps_state: int = 4
    warps_output: int = 4
    warps_grad: int = 4
    stages_state: int = 2


OPTIONS = KernelOptions()


def _block_sizes(key_dim: int, value_dim: int, programs_per_tile: int) -> tuple[int, int, int]:
    block_k = max(16, triton.next_power_of_2(key_dim))
    if block_k > 256:
        raise ValueError(f"the Triton gated delta rule supports key head dims up to 256; got K={key_dim}")
    block_v = min(64, max(16, triton.next_power_of_2(value_dim)))
    state_v = OPTIONS.state_block_v
    if state_v == 0:
        # The sequential kernels have one program per (sequence, head, V tile); below about two
        # programs per SM (132 on an H200) smaller V tiles buy more parallelism.
        state_v = min(32, block_v)
        while state_v > 16 and programs_per_tile * triton.cdiv(value_dim, state_v) < 264:
            state_v //= 2
    return block_k, block_v, state_v


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or _interpreted(x)):
        raise ValueError(
            f"the Triton gated delta rule runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
            f"got a tensor on {x.device}. Use impl='chunk' for the PyTorch path"
        )


def _dtype(name: str, x: torch.Tensor) -> torch.dtype:
    return x.dtype if name in OPTIONS.low_precision_buffers else torch.float32


def _forward(q, k, v, g, beta, scale, initial_state, output_final_state, layout: SequenceLayout, norm: bool):
    """Flattened inputs [NTOK, H, K], [NTOK, HV, V], [NTOK, HV] -> (o [NTOK, HV, V], final or None)."""
    ntok, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[1], v.shape[2]
    block_k, block_v, state_v = _block_sizes(key_dim, value_dim, layout.num_seqs * value_heads)
    w = q.new_empty(ntok, value_heads, key_dim, dtype=_dtype("w", q))
    kd = q.new_empty(ntok, value_heads, key_dim, dtype=_dtype("k", q))
    u = q.new_empty(ntok, value_heads, value_dim, dtype=_dtype("u", q))
    kernels._prepare_kernel[(layout.num_slots, value_heads)](
        q, k, v, g, beta, None,
        w, u, kd, None, None, None,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local,
        scale, heads, value_heads, key_dim, value_dim,
        BT=CHUNK, LOG2_BT=6, BK=block_k, BV=block_v, NORM=norm, BACKWARD=False,
        LOWP=OPTIONS.bf16_dots, PREC=OPTIONS.dot_precision, INV_PREC=OPTIONS.inverse_precision,
        num_warps=OPTIONS.warps_prepare,
    )
    states, vnew, final = _state_forward(q, w, u, kd, g, initial_state, output_final_state, layout, block_k, state_v)
    o = torch.empty_like(v, dtype=q.dtype)
    kernels._output_kernel[(layout.num_slots, value_heads)](
        q, k, g, states, vnew, o,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local, layout.chunk_offsets,
        scale, heads, value_heads, key_dim, value_dim,
        BT=CHUNK, BK=block_k, BV=block_v, NORM=norm, LOWP=OPTIONS.bf16_dots, PREC=OPTIONS.dot_precision,
        num_warps=OPTIONS.warps_output,
    )
    return o, final


def _state_forward(q, w, u, kd, g, initial_state, output_final_state, layout, block_k, state_v):
    ntok, value_heads, key_dim = w.shape
    value_dim = u.shape[2]
    num_chunks = layout.num_slots  # an upper bound with packed documents
    states = w.new_empty(num_chunks, value_heads, key_dim, value_dim, dtype=_dtype("states", q))
    vnew = u.new_empty(ntok, value_heads, value_dim, dtype=_dtype("delta", q))
    final = None
    if output_final_state:
        final = w.new_empty(layout.num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    kernels._state_fwd_kernel[(layout.num_seqs, value_heads, triton.cdiv(value_dim, state_v))](
        w, u, kd, g, initial_state, states, vnew, final,
        layout.cu_seqlens, layout.chunk_offsets,
        value_heads, key_dim, value_dim,
        BT=CHUNK, BK=block_k, BV=state_v,
        HAS_H0=initial_state is not None, STORE_HT=output_final_state,
        LOWP=OPTIONS.bf16_state_dots, PREC=OPTIONS.state_precision,
        num_warps=OPTIONS.warps_state, num_stages=OPTIONS.stages_state,
    )
    return states, vnew, final


def _backward(q, k, v, g, beta, scale, initial_state, layout: SequenceLayout, norm: bool, do, dht):
    """Gradients (dq, dk per q/k head, dv, dg, dbeta, dh0 or None), float32 except dv (v's dtype)."""
    ntok, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[1], v.shape[2]
    block_k, block_v, state_v = _block_sizes(key_dim, value_dim, layout.num_seqs * value_heads)
    w = q.new_empty(ntok, value_heads, key_dim, dtype=_dtype("w", q))
    kd = q.new_empty(ntok, value_heads, key_dim, dtype=_dtype("k", q))
    qd = torch.empty_like(kd)
    u = q.new_empty(ntok, value_heads, value_dim, dtype=_dtype("u", q))
    tmat = q.new_empty(ntok, value_heads, CHUNK, dtype=torch.float32)
    dvl = q.new_empty(ntok, value_heads, value_dim, dtype=torch.float32)
    kernels._prepare_kernel[(layout.num_slots, value_heads)](
        q, k, v, g, beta, do,
        w, u, kd, qd, tmat, dvl,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local,
        scale, heads, value_heads, key_dim, value_dim,
        BT=CHUNK, LOG2_BT=6, BK=block_k, BV=block_v, NORM=norm, BACKWARD=True,
        LOWP=OPTIONS.bf16_dots, PREC=OPTIONS.dot_precision, INV_PREC=OPTIONS.inverse_precision,
        num_warps=OPTIONS.warps_prepare,
    )
    states, vnew, _ = _state_forward(q, w, u, kd, g, initial_state, False, layout, block_k, state_v)
    del u
    dstates = torch.empty_like(states)
    dvnew = torch.empty_like(vnew)
    dh0 = None
    if initial_state is not None:
        dh0 = q.new_empty(layout.num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    kernels._state_bwd_kernel[(layout.num_seqs, value_heads, triton.cdiv(value_dim, state_v))](
        qd, kd, w, g, do, dvl, dht, dstates, dvnew, dh0,
        layout.cu_seqlens, layout.chunk_offsets,
        value_heads, key_dim, value_dim,
        BT=CHUNK, BK=block_k, BV=state_v,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        LOWP=OPTIONS.bf16_state_dots, PREC=OPTIONS.state_precision,
        num_warps=OPTIONS.warps_state, num_stages=OPTIONS.stages_state,
    )
    del qd, kd, w, dvl
    dq = q.new_empty(ntok, value_heads, key_dim, dtype=torch.float32)
    dk_part = torch.empty_like(dq)
    dv = torch.empty_like(v)
    dbeta_part = q.new_empty(ntok, value_heads, dtype=torch.float32)
    dgam_part = torch.empty_like(dbeta_part)
    dtmat = torch.empty_like(tmat)
    grid = (layout.num_slots, value_heads)
    kernels._grad_kernel[grid](
        q, k, v, g, beta, tmat, states, dstates, vnew, dvnew, do,
        dq, dk_part, dv, dbeta_part, dgam_part, dtmat,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local, layout.chunk_offsets,
        scale, heads, value_heads, key_dim, value_dim,
        BT=CHUNK, BK=block_k, BV=min(block_v, OPTIONS.grad_block_v), NORM=norm,
        LOWP=OPTIONS.bf16_dots, PREC=OPTIONS.dot_precision,
        num_warps=OPTIONS.warps_grad, num_stages=1,
    )
    del states, dstates, vnew, dvnew
    dk = torch.empty_like(dq)
    dbeta = torch.empty_like(dbeta_part)
    dg = torch.empty_like(dbeta_part)
    scratch = q.new_empty(layout.num_slots, value_heads, CHUNK, CHUNK, dtype=torch.float32)
    kernels._ut_grad_kernel[grid](
        k, g, beta, tmat, dtmat, dk_part, dbeta_part, dgam_part, scratch,
        dk, dbeta, dg,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local,
        heads, value_heads, key_dim,
        BT=CHUNK, BK=block_k, NORM=norm, PREC=OPTIONS.dot_precision,
        num_warps=OPTIONS.warps_grad,
    )
    if value_heads != heads:
        group = value_heads // heads
        dq = dq.view(ntok, heads, group, key_dim).sum(2)
        dk = dk.view(ntok, heads, group, key_dim).sum(2)
    return dq, dk, dv, dg, dbeta, dh0


def _flatten(q, k, v, g, beta):
    batch, seq_len = q.shape[:2]
    ntok = batch * seq_len
    return (
        q.contiguous().view(ntok, *q.shape[2:]),
        k.contiguous().view(ntok, *k.shape[2:]),
        v.contiguous().view(ntok, *v.shape[2:]),
        g.contiguous().view(ntok, g.shape[2]),
        beta.contiguous().view(ntok, beta.shape[2]),
    )


def _num_seqs(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def define_chunk_op(name: str, forward, backward):
    """Wrap host functions as the differentiable custom op `hybridlm::{name}` (and its backward,
    `hybridlm::{name}_backward`), so torch.compile and autograd treat the kernels as one opaque op.

    forward(q, k, v, g, beta, scale, h0, output_final_state, layout, norm) -> (o, final or None) and
    backward(q, k, v, g, beta, scale, h0, layout, norm, do, dht) -> (dq, dk, dv, dg, dbeta, dh0 or None)
    take flattened [tokens, heads, dim] tensors. Returns the forward op:
    op(q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm)
    -> (o, final state, or an empty tensor when not asked for).
    """

    def op_forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        scale: float,
        output_final_state: bool,
        use_qk_l2norm: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq_len = q.shape[:2]
        layout = sequence_layout(batch, seq_len, cu_seqlens, q.device)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o, final = forward(*_flatten(q, k, v, g, beta), scale, h0, output_final_state, layout, use_qk_l2norm)
        if final is None:
            final = q.new_empty(0, dtype=torch.float32)
        return o.view(v.shape), final

    def fake_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm):
        o = v.new_empty(v.shape, dtype=q.dtype)
        if output_final_state:
            shape = (_num_seqs(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3])
            return o, q.new_empty(shape, dtype=torch.float32)
        return o, q.new_empty(0, dtype=torch.float32)

    def op_backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        do: torch.Tensor,
        dht: torch.Tensor | None,
        scale: float,
        use_qk_l2norm: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq_len = q.shape[:2]
        layout = sequence_layout(batch, seq_len, cu_seqlens, q.device)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dbeta, dh0 = backward(
            *_flatten(q, k, v, g, beta), scale, h0, layout, use_qk_l2norm, do.contiguous().view(-1, *v.shape[2:]), dht
        )
        dh0 = q.new_empty(0, dtype=torch.float32) if dh0 is None else dh0.to(initial_state.dtype)
        return (
            dq.view(q.shape).to(q.dtype),
            dk.view(k.shape).to(k.dtype),
            dv.view(v.shape),
            dg.view(g.shape).to(g.dtype),
            dbeta.view(beta.shape).to(beta.dtype),
            dh0,
        )

    def fake_backward(q, k, v, g, beta, initial_state, cu_seqlens, do, dht, scale, use_qk_l2norm):
        dh0 = q.new_empty(0, dtype=torch.float32) if initial_state is None else torch.empty_like(initial_state)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
                torch.empty_like(beta), dh0)

    def setup_context(ctx, inputs, output):
        q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm = inputs
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.scale = scale
        ctx.use_qk_l2norm = use_qk_l2norm
        ctx.output_final_state = output_final_state

    def autograd_backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        if not ctx.output_final_state:
            dht = None
        dq, dk, dv, dg, dbeta, dh0 = backward_op(
            q, k, v, g, beta, initial_state, cu_seqlens, do, dht, ctx.scale, ctx.use_qk_l2norm
        )
        return dq, dk, dv, dg, dbeta, (dh0 if initial_state is not None else None), None, None, None, None

    forward_op = torch.library.custom_op(f"hybridlm::{name}", op_forward, mutates_args=())
    forward_op.register_fake(fake_forward)
    backward_op = torch.library.custom_op(f"hybridlm::{name}_backward", op_backward, mutates_args=())
    backward_op.register_fake(fake_backward)
    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op


_gdn_chunk = define_chunk_op("gdn_chunk", _forward, _backward)


@torch.library.custom_op("hybridlm::gdn_recurrent", mutates_args=())
def _gdn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    output_final_state: bool,
    use_qk_l2norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    qf, kf, vf, gf, bf = _flatten(q, k, v, g, beta)
    if cu_seqlens is None:
        cu = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seq_len
    else:
        cu = cu_seqlens.to(torch.int32)
    num_seqs = cu.shape[0] - 1
    o = torch.empty_like(vf, dtype=q.dtype)
    final = q.new_empty(num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    _launch_recurrent(qf, kf, vf, gf, bf, o, h0, final, cu, scale, use_qk_l2norm)
    if not output_final_state:
        final = q.new_empty(0, dtype=torch.float32)
    return o.view(v.shape), final


@_gdn_recurrent.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm):
    o = v.new_empty(v.shape, dtype=q.dtype)
    if output_final_state:
        shape = (_num_seqs(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3])
        return o, q.new_empty(shape, dtype=torch.float32)
    return o, q.new_empty(0, dtype=torch.float32)


def _launch_recurrent(q, k, v, g, beta, o, h0, ht, cu, scale, norm):
    heads, key_dim = q.shape[1], q.shape[2]
    value_heads, value_dim = v.shape[1], v.shape[2]
    block_k = max(16, triton.next_power_of_2(key_dim))
    block_v = min(32, max(16, triton.next_power_of_2(value_dim)))
    num_seqs = cu.shape[0] - 1
    kernels._recurrent_kernel[(num_seqs, value_heads, triton.cdiv(value_dim, block_v))](
        q, k, v, g, beta, o, h0, ht, cu,
        scale, heads, value_heads,
        K=key_dim, V=value_dim, BK=block_k, BV=block_v,
        NORM=norm, HAS_H0=h0 is not None, STORE_HT=ht is not None,
        num_warps=4 if block_k >= 128 else 2,
    )


def chunk_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in Triton, differentiable (fla layouts, as `gated_delta_rule`).

    q, k: [B, T, H, K] (K <= 256); v: [B, T, HV, V] with HV a multiple of H; g (log decay, <= 0),
    beta: [B, T, HV]; initial_state: [N, HV, K, V] (N = B, or documents in cu_seqlens, B == 1).
    Inputs are not validated here (`gated_delta_rule` does that).
    Returns (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 or None).
    """
    _check_device(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, final = _gdn_chunk(q, k, v, g, beta, initial_state, cu_seqlens, float(scale), output_final_state, use_qk_l2norm)
    return o, (final if output_final_state else None)


def recurrent_gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule in Triton (decoding; forward only). Arguments as above."""
    _check_device(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, final = _gdn_recurrent(
        q, k, v, g, beta, initial_state, cu_seqlens, float(scale), output_final_state, use_qk_l2norm
    )
    return o, (final if output_final_state else None)


def gated_delta_rule_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """One decoding step for a batch of sequences, updating `state` in place.

    q, k: [B, 1, H, K]; v: [B, 1, HV, V]; g, beta: [B, 1, HV]; state: [B, HV, K, V] float32,
    contiguous (read, advanced by the token, written back). Returns o [B, 1, HV, V] in q's dtype.
    """
    _check_device(q)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor; got {state.dtype}, contiguous={state.is_contiguous()}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch, seq_len = q.shape[:2]
    qf, kf, vf, gf, bf = _flatten(q, k, v, g, beta)
    o = torch.empty_like(vf, dtype=q.dtype)
    cu = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seq_len
    _launch_recurrent(qf, kf, vf, gf, bf, o, state, state, cu, float(scale), use_qk_l2norm)
    return o.view(v.shape)
