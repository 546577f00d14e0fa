"""Rotary position embeddings (rotate-half convention), with optional YaRN scaling.

cos/sin are computed and kept in float32 (OLMo-core convention, followed by transformers'
Olmo Hybrid): the rotation is applied in float32 and the result cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the attention scaling factor for cos/sin.

    scaling: None (plain RoPE) or {"rope_type": "yarn", "factor", "original_max_position_embeddings",
    "beta_fast" (32), "beta_slow" (1)} as in the YaRN paper (Peng et al. 2023) and the Hugging Face config.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    attention_factor = 1.0
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "default":
            pass
        elif rope_type == "yarn":
            inv_freq, attention_factor = _yarn(inv_freq, head_dim, theta, scaling)
        else:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: 'yarn' (or None)")
    return inv_freq.float(), attention_factor


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast", 32.0))
    beta_slow = float(scaling.get("beta_slow", 1.0))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def dimension_for_rotations(rotations: float) -> float:
        # The dimension index whose wavelength makes `rotations` turns over the original context.
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(dimension_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dimension_for_rotations(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency (interpolated)
    interpolated = inv_freq / factor
    inv_freq = interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Produces float32 (cos, sin) of shape [B, T, head_dim] for integer positions [B, T]."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq, self.attention_factor = rope_inverse_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (rotate-half convention), in float32."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).to(x.dtype)
