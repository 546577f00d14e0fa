"""Small pieces shared by the implementations: compute dtype, q/k normalisation, document lengths."""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (gradient checks), float32 otherwise (bf16/fp16/fp32 inputs).

    The cumulative decays, the UT-transform matrix and the states stay in this dtype.
    """
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on `device`: the implementations pick their own precision (float32 decays,
    UT transform and states), which autocast's bf16 matmuls would silently undo."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def normalize_qk(
    q: torch.Tensor, k: torch.Tensor, scale: float, use_qk_l2norm: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast q, k to `dtype`, L2-normalise each head if asked, and fold `scale` into q.

    x -> x * rsqrt(sum(x^2) + 1e-6) over the last dimension (fla's and transformers' l2norm).
    Plain differentiable torch ops: autograd takes care of their backward.
    """
    q, k = q.to(dtype), k.to(dtype)
    if use_qk_l2norm:
        q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    return q * scale, k


def document_bounds(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> tuple[list[int], list[int]]:
    """(starts, lengths) of every document in the flattened [B * T] token order.

    Without cu_seqlens each batch row is one document; with it (B == 1) the documents are the
    packed segments cu_seqlens[n] .. cu_seqlens[n+1].
    """
    if cu_seqlens is None:
        return [b * seq_len for b in range(batch)], [seq_len] * batch
    bounds = cu_seqlens.tolist()
    return bounds[:-1], [end - start for start, end in zip(bounds[:-1], bounds[1:])]
