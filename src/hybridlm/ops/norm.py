"""RMS normalisations used by the model, in the Olmo 2 numerics convention.

Both compute in float32 and apply the weight in float32 before casting back to the input dtype.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dimension.

    x: [..., D] any float dtype; weight: [D]. Returns x's dtype. The weight is applied in float32
    (Olmo 2 / Olmo 3 / Olmo Hybrid convention), then the result is cast back.
    """
    input_dtype = x.dtype
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(input_dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm: rms_norm(x) * weight * silu(gate), all in float32.

    x, gate: [..., D] (D is the value head dim; one weight shared by all heads); weight: [D].
    Returns x's dtype. Everything is computed in float32 as fla's fused kernel does; in float32
    this equals transformers' implementation exactly.
    """
    if x.is_cuda and TRITON_AVAILABLE and x.dtype != torch.float64:
        # One fused Triton kernel each way (hybridlm.ops.triton.norm); the lines below are its reference.
        from hybridlm.ops.triton.norm import gated_rms_norm_triton

        return gated_rms_norm_triton(x, gate, weight, eps)
    input_dtype = x.dtype
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() * F.silu(gate.float())).to(input_dtype)


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dimension, computed in float32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)
