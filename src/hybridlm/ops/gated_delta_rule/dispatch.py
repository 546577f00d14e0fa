"""`gated_delta_rule`: input checks and the choice of implementation.

Implementations are registered backends. `impl="auto"` asks each backend, highest priority first,
whether it wants the call (`prefers(q, needs_grad)`) and takes the first that does; the built-in
`chunk` backend always accepts, so the search ends there. A GPU backend (our Triton kernels, fla)
registers itself with a higher priority and `prefers=lambda q, needs_grad: q.is_cuda`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from hybridlm.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from hybridlm.ops.gated_delta_rule.recurrent import recurrent_gated_delta_rule
from hybridlm.ops.gated_delta_rule.triton.backend import note_backend_choice, register_gpu_backends

# Without gradients, up to this many tokens the token loop beats the fixed cost of the chunked
# form (which always works on whole chunks of 64); decoding (T == 1) is the case that matters.
RECURRENT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Backend:
    """One implementation of the gated delta rule.

    fn: called with validated inputs as fn(q, k, v, g, beta, *, scale (a float), initial_state,
        output_final_state, cu_seqlens, use_qk_l2norm) -> (o, final_state or None).
    priority: `auto` asks backends in decreasing priority.
    prefers: (q, needs_grad) -> True if `auto` should use this backend for these inputs.
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    priority: int
    prefers: Callable[[torch.Tensor, bool], bool]


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    *,
    priority: int,
    prefers: Callable[[torch.Tensor, bool], bool],
) -> None:
    """Make `fn` available as `gated_delta_rule(..., impl=name)` and as a candidate for "auto"."""
    if name == "auto":
        raise ValueError('"auto" is reserved for the automatic choice; pick another backend name')
    _BACKENDS[name] = Backend(name, fn, priority, prefers)


def available_impls() -> list[str]:
    """Valid values of `impl`: "auto" and every registered backend."""
    return ["auto", *_BACKENDS]


register_backend("chunk", chunk_gated_delta_rule, priority=0, prefers=lambda q, needs_grad: True)
register_backend(
    "recurrent",
    recurrent_gated_delta_rule,
    priority=10,
    prefers=lambda q, needs_grad: not needs_grad and q.shape[1] <= RECURRENT_MAX_TOKENS,
)
# GPU backends: "triton-split" (auto's choice for CUDA tensors; also named "triton") and "fla" (by name only).
register_gpu_backends(register_backend)


def gated_delta_rule(
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
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (Gated DeltaNet's token mixer), fla layouts.

    Per value head, with the state S: [K, V]:
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = S_t^T (scale * q_t)
    with q, k L2-normalised per head (x * rsqrt(sum x^2 + 1e-6)) when use_qk_l2norm.

    Args:
        q, k: [B, T, H, K].
        v: [B, T, HV, V], HV a multiple of H; value head j uses q/k head j // (HV / H).
        g: [B, T, HV] log decay, <= 0 (not checked: that would need a device sync).
        beta: [B, T, HV] in [0, 2]; beta > 1 gives negative eigenvalues (not checked either).
        scale: query scale, K ** -0.5 when None.
        initial_state: [N, HV, K, V] (N = B, or the number of documents with cu_seqlens); any float
            dtype, used in float32 (float64 for float64 inputs). Zeros when None.
        output_final_state: return the state after the last token of each sequence/document.
        cu_seqlens: integer [N + 1] offsets of N packed documents (B == 1); the state restarts
            from initial_state[n] (or zeros) at each document.
        use_qk_l2norm: L2-normalise q and k inside (the Olmo Hybrid setting).
        impl: "auto", "chunk" or "recurrent" (see `available_impls()`).
    Returns:
        (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 (float64 for float64
        inputs) if output_final_state else None).
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero number (None means K ** -0.5); got {scale}")
    backend = _select_backend(impl, q, (q, k, v, g, beta, initial_state))
    note_backend_choice(backend.name, q)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return _empty_result(q, v, initial_state, cu_seqlens, output_final_state)
    return backend.fn(
        q,
        k,
        v,
        g,
        beta,
        scale=float(scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
    )


def _empty_result(q, v, initial_state, cu_seqlens, output_final_state):
    """No tokens (B == 0 or T == 0): empty outputs, and each state passes through unchanged."""
    o = v.new_zeros(v.shape, dtype=q.dtype)
    if not output_final_state:
        return o, None
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        return o, initial_state.to(dtype, copy=True)
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    return o, q.new_zeros(num_seqs, v.shape[2], q.shape[3], v.shape[3], dtype=dtype)


def _select_backend(impl: str, q: torch.Tensor, tensors: tuple) -> Backend:
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
        candidates = sorted(_BACKENDS.values(), key=lambda backend: -backend.priority)
        return next(backend for backend in candidates if backend.prefers(q, needs_grad))
    if impl not in _BACKENDS:
        raise ValueError(f"unknown impl {impl!r}; valid values are {available_impls()}")
    return _BACKENDS[impl]


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    """Shapes, ranks, dtypes and devices; raises ValueError naming the offending tensor."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = type(x).__name__ if not isinstance(x, torch.Tensor) else f"dtype {x.dtype}"
            raise ValueError(f"{name} must be a floating-point tensor; got {what}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K]; got {tuple(q.shape)}")
    batch, seq_len, heads, key_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must be [B, T, H, K] like q {tuple(q.shape)}; got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % heads != 0 or v.shape[2] == 0:
        raise ValueError(
            f"v must be [B, T, HV, V] with B={batch}, T={seq_len} and HV a multiple of H={heads}; "
            f"got {tuple(v.shape)}"
        )
    value_heads, value_dim = v.shape[2], v.shape[3]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, seq_len, value_heads):
            raise ValueError(
                f"{name} must be [B, T, HV] = {(batch, seq_len, value_heads)} (one value per token and "
                f"value head); got {tuple(x.shape)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if initial_state is not None and (
        not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point()
    ):
        raise ValueError(
            f"initial_state must be a floating-point tensor [N, HV, K, V] or None; got {initial_state!r:.80}"
        )
    if cu_seqlens is not None and (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.numel() < 2
        or cu_seqlens.is_floating_point()
        or cu_seqlens.is_complex()
        or cu_seqlens.dtype == torch.bool
    ):
        what = (
            f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            if isinstance(cu_seqlens, torch.Tensor)
            else type(cu_seqlens).__name__
        )
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [N + 1] of document offsets; got {what}")
    tensors = {
        "q": q,
        "k": k,
        "v": v,
        "g": g,
        "beta": beta,
        "initial_state": initial_state,
        "cu_seqlens": cu_seqlens,
    }
    for name, x in tensors.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device")

    num_seqs = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(
                f"cu_seqlens needs packed inputs with B == 1; got B={batch}. Flatten the batch into one "
                "row (e.g. q.reshape(1, -1, H, K)) and describe the documents with cu_seqlens"
            )
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != seq_len or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"cu_seqlens must be non-decreasing, start at 0 and end at T={seq_len}; got {bounds}"
            )
        num_seqs = len(bounds) - 1
    if initial_state is not None:
        expected = (num_seqs, value_heads, key_dim, value_dim)
        if initial_state.shape != expected:
            raise ValueError(
                f"initial_state must be [N, HV, K, V] = {expected} (N = "
                f"{'number of documents in cu_seqlens' if cu_seqlens is not None else 'B'}); "
                f"got {tuple(initial_state.shape)}"
            )
