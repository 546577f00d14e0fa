"""Host side of the Triton gated delta rule shared by its paths, and the token-by-token path.

`define_chunk_op` wraps a chunked implementation's host functions as a differentiable
torch.library custom op (`chunk_split.py`, the training/prefill path, uses it), so torch.compile
treats the kernels as opaque calls with known output shapes instead of tracing into Triton.
`recurrent_gated_delta_rule_triton` is the decoding path (one or a few tokens, forward only) and
`gated_delta_rule_decode_` one decoding step that advances a state in place (`hybridlm::gdn_recurrent`).
"""

from __future__ import annotations

import os

import torch
import triton

from hybridlm.ops.gated_delta_rule.triton import kernels
from hybridlm.ops.gated_delta_rule.triton.layout import sequence_layout


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or _interpreted(x)):
        raise ValueError(
            f"the Triton gated delta rule runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
            f"got a tensor on {x.device}. Use impl='chunk' for the PyTorch path"
        )


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


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, heads, dim] -> [B*T, heads, dim] with heads and dims packed (strides dim, 1), as a view
    when x's tokens sit at one stride (e.g. q, k, v sliced from one [B, T, q|k|v] tensor), else a
    contiguous copy."""
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _flatten_rows(q, k, v, g, beta):
    """The chunked kernels' inputs: q, k, v as `_token_rows` (q and k at one token stride, which the
    kernels take as an argument; v at its own), g and beta contiguous."""
    ntok = q.shape[0] * q.shape[1]
    qf, kf, vf = _token_rows(q), _token_rows(k), _token_rows(v)
    if qf.stride(0) != kf.stride(0):
        qf, kf = qf.contiguous(), kf.contiguous()
    return qf, kf, vf, g.contiguous().view(ntok, g.shape[2]), beta.contiguous().view(ntok, beta.shape[2])


def _num_seqs(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fake_forward(q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, use_qk_l2norm):
    """Output shapes and dtypes of the forward ops (torch.compile's fake tensors): o in q's dtype, the
    float32 final state, or an empty tensor when not asked for."""
    o = v.new_empty(v.shape, dtype=q.dtype)
    if output_final_state:
        shape = (_num_seqs(q, cu_seqlens), v.shape[2], q.shape[3], v.shape[3])
        return o, q.new_empty(shape, dtype=torch.float32)
    return o, q.new_empty(0, dtype=torch.float32)


def call_gdn_op(op, q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    """The public functions' common body: check the device, default the scale to K^-0.5, call the op
    and drop the placeholder final state when none was asked for."""
    _check_device(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, final = op(q, k, v, g, beta, initial_state, cu_seqlens, float(scale), output_final_state, use_qk_l2norm)
    return o, (final if output_final_state else None)


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
        o, final = forward(*_flatten_rows(q, k, v, g, beta), scale, h0, output_final_state, layout, use_qk_l2norm)
        if final is None:
            final = q.new_empty(0, dtype=torch.float32)
        return o.view(v.shape), final

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
            *_flatten_rows(q, k, v, g, beta), scale, h0, layout, use_qk_l2norm, do.contiguous().view(-1, *v.shape[2:]), dht
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
    forward_op.register_fake(_fake_forward)
    backward_op = torch.library.custom_op(f"hybridlm::{name}_backward", op_backward, mutates_args=())
    backward_op.register_fake(fake_backward)
    forward_op.register_autograd(autograd_backward, setup_context=setup_context)
    return forward_op


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


_gdn_recurrent.register_fake(_fake_forward)


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
    """Token-by-token gated delta rule in Triton (decoding; forward only, no gradients).

    q, k: [B, T, H, K] (K <= 256); v: [B, T, HV, V] with HV a multiple of H; g (log decay, <= 0),
    beta: [B, T, HV]; initial_state: [N, HV, K, V] (N = B, or documents in cu_seqlens, B == 1).
    Returns (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 or None).
    """
    return call_gdn_op(_gdn_recurrent, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)


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
