"""Fused gated RMSNorm in Triton (the GDN output norm): forward and backward in one pass each.

Same function as `hybridlm.ops.norm.gated_rms_norm` (the reference beside it), all in float32:
    y = x * rsqrt(mean(x^2) + eps) * weight * silu(gate)
over the last dimension D, one weight [D] shared by all rows. The PyTorch version runs about eight
elementwise kernels and keeps their float32 intermediates for autograd; this one reads x and gate
once, writes y once, and recomputes the row statistics in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_rms_norm_fwd_kernel(
    x, gate, weight, y, num_rows, D, eps,
    BM: tl.constexpr, BD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    m = (rows < num_rows)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    xv = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    gv = tl.load(gate + off, mask=m, other=0.0).to(tl.float32)
    wv = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    out = xv * rstd[:, None] * wv[None, :] * (gv * tl.sigmoid(gv))
    tl.store(y + off, out.to(y.dtype.element_ty), mask=m)


@triton.jit
def _gated_rms_norm_bwd_kernel(
    x, gate, weight, dy, dx, dgate, dw_partial, num_rows, D, eps,
    BM: tl.constexpr, BD: tl.constexpr,
):
    """n = x r, s = silu(gate): dx = r (dn - n mean(dn n)) with dn = dy w s;
    dgate = dy n w silu'(gate); dweight = sum_rows dy n s (per program, summed by the caller)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    m = (rows < num_rows)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    xv = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
    gv = tl.load(gate + off, mask=m, other=0.0).to(tl.float32)
    dyv = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    wv = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    n = xv * rstd[:, None]
    sig = tl.sigmoid(gv)
    s = gv * sig
    dn = dyv * wv[None, :] * s
    dxv = rstd[:, None] * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
    dgv = dyv * n * wv[None, :] * sig * (1.0 + gv * (1.0 - sig))
    tl.store(dx + off, dxv.to(dx.dtype.element_ty), mask=m)
    tl.store(dgate + off, dgv.to(dgate.dtype.element_ty), mask=m)
    tl.store(dw_partial + pid * D + cols, tl.sum(dyv * n * s, 0), mask=cols < D)


def _rows_per_program(block_d: int) -> int:
    return max(1, min(16, 4096 // block_d))


@torch.library.custom_op("hybridlm::gated_rms_norm", mutates_args=())
def _gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dim = x.shape[-1]
    xc, gc = x.contiguous(), gate.contiguous()
    num_rows = xc.numel() // dim
    y = torch.empty_like(xc)
    block_d = triton.next_power_of_2(dim)
    block_m = _rows_per_program(block_d)
    _gated_rms_norm_fwd_kernel[(triton.cdiv(num_rows, block_m),)](
        xc, gc, weight.contiguous(), y, num_rows, dim, eps, BM=block_m, BD=block_d
    )
    return y


@_gated_rms_norm.register_fake
def _(x, gate, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("hybridlm::gated_rms_norm_backward", mutates_args=())
def _gated_rms_norm_backward(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dim = x.shape[-1]
    xc, gc = x.contiguous(), gate.contiguous()
    num_rows = xc.numel() // dim
    block_d = triton.next_power_of_2(dim)
    block_m = _rows_per_program(block_d)
    programs = triton.cdiv(num_rows, block_m)
    dx = torch.empty_like(xc)
    dgate = torch.empty_like(gc)
    dw_partial = x.new_empty(programs, dim, dtype=torch.float32)
    _gated_rms_norm_bwd_kernel[(programs,)](
        xc, gc, weight.contiguous(), dy.contiguous(), dx, dgate, dw_partial, num_rows, dim, eps,
        BM=block_m, BD=block_d,
    )
    return dx, dgate, dw_partial.sum(0).to(weight.dtype)


@_gated_rms_norm_backward.register_fake
def _(x, gate, weight, dy, eps):
    return torch.empty_like(x), torch.empty_like(gate), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, gate, weight, eps = inputs
    ctx.save_for_backward(x, gate, weight)
    ctx.eps = eps


def _autograd(ctx, dy):
    x, gate, weight = ctx.saved_tensors
    dx, dgate, dw = _gated_rms_norm_backward(x, gate, weight, dy, ctx.eps)
    return dx, dgate, dw, None


_gated_rms_norm.register_autograd(_autograd, setup_context=_setup)


def gated_rms_norm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `gated_rms_norm`: x, gate [..., D] (same shape, any float dtypes); weight [D]. Returns x's dtype."""
    if gate.shape != x.shape or weight.shape != (x.shape[-1],):
        raise ValueError(
            f"gated_rms_norm expects x and gate of one shape [..., D] and weight [D]; got x {tuple(x.shape)}, "
            f"gate {tuple(gate.shape)}, weight {tuple(weight.shape)}"
        )
    return _gated_rms_norm(x, gate, weight, float(eps))
