"""Depthwise causal short convolution (kernel W, no bias) followed by an optional SiLU.

This is the GDN layer's short conv over the flat q, k and v projections. Causality means output t
sees inputs t-W+1 .. t; the left context is the cached last W-1 inputs of the sequence (decoding,
continuation) or zeros. With packed documents (`cu_seqlens`) each document starts from its own
left context, so nothing leaks across a boundary.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv over time.

    Args:
        x: [B, T, C] inputs (time-major, as the projections produce them).
        weight: [C, W] or [C, 1, W] (the checkpoint layout); tap W-1 multiplies the current input.
        activation: "silu" or None.
        initial_state: [N, C, W-1] the W-1 inputs preceding each sequence (N = B, or the number of
            documents with cu_seqlens); zeros when None.
        output_final_state: also return the last W-1 inputs of each sequence, [N, C, W-1], in x's dtype.
        cu_seqlens: int tensor [N+1] of document offsets; requires B == 1.
    Returns:
        (y [B, T, C] in x's dtype, final_state or None).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d expects x [B, T, C] and weight [C, W] (or [C, 1, W]) with matching C; "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if activation not in ("silu", None):
        raise ValueError(f"activation must be 'silu' or None; got {activation!r}")
    differentiable_cache = initial_state is not None and initial_state.requires_grad
    if x.is_cuda and TRITON_AVAILABLE and x.dtype != torch.float64 and not differentiable_cache:
        # The fused Triton kernel (hybridlm.ops.triton.conv); this function's body is its reference
        # (and the path for float64 and for a cache that needs a gradient).
        from hybridlm.ops.triton.conv import causal_conv1d_triton

        return causal_conv1d_triton(
            x, weight, activation=activation, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    batch, seq_len, channels = x.shape
    width = weight.shape[1]
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens requires x with batch size 1 (packed documents); got batch {batch}")
        x_ext, out_index, last_index = _insert_document_contexts(x[0], cu_seqlens, width, initial_state)
        y = _conv_valid(x_ext.unsqueeze(0), weight)[0]
        y = y.index_select(0, out_index - (width - 1)).unsqueeze(0)
        final_state = None
        if output_final_state:
            final_state = x_ext[last_index].permute(0, 2, 1).contiguous()
    else:
        if initial_state is None:
            context = x.new_zeros(batch, width - 1, channels)
        else:
            if initial_state.shape != (batch, channels, width - 1):
                raise ValueError(
                    f"initial_state must be [B, C, W-1] = {(batch, channels, width - 1)}; "
                    f"got {tuple(initial_state.shape)}"
                )
            context = initial_state.transpose(1, 2).to(x.dtype)
        x_ext = torch.cat([context, x], dim=1)
        y = _conv_valid(x_ext, weight)
        final_state = x_ext[:, -(width - 1):].transpose(1, 2).contiguous() if output_final_state else None
    if activation == "silu":
        y = F.silu(y)
    return y, final_state


def _conv_valid(x_ext: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weight[:, j] * x_ext[t + j] for t in [0, T_ext - W + 1). x_ext: [B, T_ext, C].

    Accumulates in float32 for low-precision inputs; returns x_ext's dtype.
    """
    width = weight.shape[1]
    out_len = x_ext.shape[1] - width + 1
    acc_dtype = torch.float32 if x_ext.dtype in (torch.float16, torch.bfloat16) else x_ext.dtype
    w = weight.to(acc_dtype)
    y = x_ext[:, 0:out_len].to(acc_dtype) * w[:, 0]
    for j in range(1, width):
        y = y + x_ext[:, j : j + out_len].to(acc_dtype) * w[:, j]
    return y.to(x_ext.dtype)


def _insert_document_contexts(
    x: torch.Tensor, cu_seqlens: torch.Tensor, width: int, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build a stream where each document is preceded by its own W-1 context columns.

    x: [T, C]. Returns (x_ext [T + N*(W-1), C], out_index [T]: position of each original token in
    x_ext, last_index [N, W-1]: positions of each document's last W-1 inputs in x_ext).
    """
    seq_len, channels = x.shape
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    num_docs = cu.numel() - 1
    if cu.dim() != 1 or num_docs < 1 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must be a non-decreasing 1-D tensor from 0 to T={seq_len}; got {cu.tolist()}"
        )
    pad = width - 1
    lengths = cu[1:] - cu[:-1]
    doc_of_token = torch.repeat_interleave(torch.arange(num_docs, device=x.device), lengths)
    out_index = torch.arange(seq_len, device=x.device) + pad * (doc_of_token + 1)
    x_ext = x.new_zeros(seq_len + num_docs * pad, channels)
    x_ext[out_index] = x
    context_start = cu[:-1] + pad * torch.arange(num_docs, device=x.device)
    context_index = context_start[:, None] + torch.arange(pad, device=x.device)[None, :]
    if initial_state is not None:
        if initial_state.shape != (num_docs, channels, pad):
            raise ValueError(
                f"initial_state must be [N, C, W-1] = {(num_docs, channels, pad)} with cu_seqlens; "
                f"got {tuple(initial_state.shape)}"
            )
        x_ext[context_index.reshape(-1)] = initial_state.transpose(1, 2).reshape(-1, channels).to(x.dtype)
    # A document's last W-1 inputs end where its tokens end; for short documents they reach back
    # into its context columns, which is exactly the state a continuation needs.
    doc_end_ext = cu[1:] + pad * (torch.arange(num_docs, device=x.device) + 1)
    last_index = doc_end_ext[:, None] - pad + torch.arange(pad, device=x.device)[None, :]
    return x_ext, out_index, last_index
