"""Derived inference weights: tensors computed from parameters (stacked projections, precomputed gate
constants, RoPE tables) for the fused one-token decoding path, and its two fused helpers.

They are plain attributes, not parameters or buffers: `state_dict`, save/load, optimizers and
`Module.to` never see them. A module that owns some mixes in `HasInferenceWeights` and says what its
derived tensors are built from (`_inference_sources`) and how (`_build_inference_weights`).

Staleness: the derived tensors remember the identity (address, version counter, dtype, device,
shape) of every source parameter, and `inference_weights()` rebuilds them when any source changed
(an optimizer step, `load_state_dict`, `Module.to`, or an in-place edit under `torch.no_grad()`).
Edits that bypass the version counter (through `param.data`, or on parameters created under
`torch.inference_mode()`) are not seen: call `refresh_inference_weights()` after those.
Rebuilding refills the existing tensors in place when shapes, dtypes and devices allow, so a CUDA
graph captured with them stays valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _identity(tensor: torch.Tensor) -> tuple:
    version = None if tensor.is_inference() else tensor._version
    return (tensor.data_ptr(), version, tensor.dtype, tensor.device, tuple(tensor.shape), tensor.stride())


class HasInferenceWeights:
    """Mixin for an `nn.Module` with derived inference tensors.

    Subclasses define `_inference_sources() -> list[Tensor]` (the parameters the tensors are built
    from) and `_build_inference_weights() -> dict[str, Tensor]` (called under no_grad).
    """

    _inference_key: tuple | None = None
    _inference_tensors: dict[str, torch.Tensor] | None = None

    def _inference_sources(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _build_inference_weights(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _current_key(self) -> tuple:
        return tuple(_identity(t) for t in self._inference_sources())

    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The derived tensors, rebuilt first if a source parameter changed since they were built."""
        if self._inference_tensors is None or self._inference_key != self._current_key():
            self.refresh_inference_weights()
        return self._inference_tensors

    def prepared_inference_weights(self) -> dict[str, torch.Tensor] | None:
        """The derived tensors if they were built and are up to date, else None (never builds them:
        paths that training may also run, like a prefill under no_grad, use them only when a caller
        asked for them with `HybridLM.prepare_for_inference`)."""
        if self._inference_tensors is None or self._inference_key != self._current_key():
            return None
        return self._inference_tensors

    def drop_inference_weights(self) -> None:
        """Free this module's derived tensors (`inference_weights()` builds them again)."""
        self._inference_tensors = None
        self._inference_key = None

    @torch.no_grad()
    def refresh_inference_weights(self) -> bool:
        """Rebuild the derived tensors from the current parameters. Returns True if any tensor was
        newly allocated (a CUDA graph captured with the old ones must be captured again); tensors
        whose shape, dtype and device did not change are refilled in place."""
        fresh = {name: tensor.detach() for name, tensor in self._build_inference_weights().items()}
        old = self._inference_tensors or {}
        reallocated = False
        for name, tensor in fresh.items():
            kept = old.get(name)
            same_layout = (
                kept is not None
                and kept.shape == tensor.shape
                and kept.dtype == tensor.dtype
                and kept.device == tensor.device
            )
            if not same_layout:
                reallocated = True
            elif kept.data_ptr() != tensor.data_ptr():
                fresh[name] = kept.copy_(tensor)
        reallocated = reallocated or set(old) != set(fresh)
        self._inference_tensors = fresh
        self._inference_key = self._current_key()
        return reallocated


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`hybridlm.ops.norm.rms_norm` through torch's RMSNorm: x [..., D], weight [D] -> x's dtype.

    Same numerics (x in float32, normalised, times the weight in float32, one cast back): for
    bf16/fp16/fp32 x with a weight of its dtype, torch computes exactly that, on CUDA in one fused
    kernel instead of about nine (on CPU the result is bitwise equal to `rms_norm`). Other
    combinations (float64, as in gradient checks) cast to float32 first, as `rms_norm` does.
    """
    if weight.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def apply_rotary_fused(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`hybridlm.nn.rope.apply_rotary` in four kernels instead of seven: x [B, T, H, D] rotated by
    cos [B, T, D] and signed_sin = sin * `rotary_sign(D)`, in float32, returned in x's dtype.

    rotate_half(x) * sin = roll(x, D/2) * signed_sin exactly (a sign flip is exact). bf16/fp16 x is
    not cast first: type promotion with the float32 cos/sin computes in float32 all the same.
    """
    dtype = x.dtype
    if dtype == torch.float64:  # the reference rotates in float32 whatever the input
        x = x.float()
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return torch.addcmul(x * cos[:, :, None, :], rolled, signed_sin[:, :, None, :]).to(dtype)


def rotary_sign(head_dim: int, *, device) -> torch.Tensor:
    """[-1] * (head_dim / 2) ++ [1] * (head_dim / 2), float32: sin times this is `signed_sin`."""
    half = head_dim // 2
    return torch.cat([torch.full((half,), -1.0, device=device), torch.ones(head_dim - half, device=device)])
