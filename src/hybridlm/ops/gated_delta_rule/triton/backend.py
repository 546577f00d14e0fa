"""The GPU backends of `gated_delta_rule`: our Triton kernels ("triton-split", also named "triton")
and fla ("fla").

`register_gpu_backends(register_backend)` adds them to the dispatcher. "triton-split" (split-bf16
matmuls, `triton/chunk_split.py`) has the highest priority and is preferred for every CUDA tensor
(but float64) when Triton is installed, so `impl="auto"` picks it on GPUs. "triton" is the same
backend by another name (it named the first, tf32 kernels, removed once the split ones were faster
and more accurate everywhere; docs/benchmarks.md). "fla" is used only when asked for by name, and
only where its version is known to give correct gradients. `note_backend_choice` logs the choice
once and warns when a CUDA call ends up on a PyTorch path. Importing this module imports neither
Triton nor fla.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

# Without gradients, up to this many tokens per sequence the token loop beats the chunked form.
RECURRENT_MAX_TOKENS = 16

# fla-core >= 0.6.0 refuses its chunked backward on Hopper with Triton in [3.4.0, 3.7.1): one of
# its backward kernels is miscompiled there (fla issue #640); its forward is fine.
_FLA_BAD_TRITON = ((3, 4, 0), (3, 7, 1))


def _chunk_or_token_loop(chunked, q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens,
                         use_qk_l2norm):
    """The chunked kernels `chunked`, or the Triton token loop for short inputs without gradients."""
    from hybridlm.ops.gated_delta_rule.triton.chunk import recurrent_gated_delta_rule_triton

    tensors = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    short = cu_seqlens is None and q.shape[1] <= RECURRENT_MAX_TOKENS
    fn = recurrent_gated_delta_rule_triton if short and not needs_grad else chunked
    return fn(
        q, k, v, g, beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm,
    )


def triton_split_gated_delta_rule(
    q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None, use_qk_l2norm=True
):
    """Backend "triton-split" (auto's choice on CUDA): the split-bf16 chunked kernels, or the token
    loop for short inputs without gradients."""
    from hybridlm.ops.gated_delta_rule.triton.chunk_split import chunk_gated_delta_rule_triton_split

    return _chunk_or_token_loop(
        chunk_gated_delta_rule_triton_split, q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
    )


def prefers_triton(q: torch.Tensor, needs_grad: bool) -> bool:
    # float64 (gradient checks) stays on the PyTorch paths: the kernels compute in float32.
    return q.is_cuda and TRITON_AVAILABLE and q.dtype != torch.float64


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def fla_problem(q: torch.Tensor, needs_grad: bool) -> str | None:
    """Why fla cannot serve this call (None if it can)."""
    if importlib.util.find_spec("fla") is None:
        return "fla is not installed (pip install fla-core)"
    if not q.is_cuda:
        return f"fla runs on CUDA tensors; got a tensor on {q.device}"
    import triton

    major, _ = torch.cuda.get_device_capability(q.device)
    low, high = _FLA_BAD_TRITON
    if needs_grad and major == 9 and low <= _version_tuple(triton.__version__) < high:
        return (
            f"fla's chunked backward gives wrong gradients on Hopper with Triton {triton.__version__} "
            f"(bad range [3.4.0, 3.7.1), fla issue #640); use impl='auto' (our kernels) or upgrade Triton to >= 3.7.1"
        )
    return None


def fla_gated_delta_rule(
    q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None, use_qk_l2norm=True
):
    """Backend "fla": fla.ops.gated_delta_rule.chunk_gated_delta_rule with our argument conventions."""
    tensors = (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    problem = fla_problem(q, needs_grad)
    if problem is not None:
        raise ValueError(f"impl='fla' is not usable here: {problem}")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(
        q, k, v, g.float(), beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
        use_qk_l2norm_in_kernel=use_qk_l2norm,
    )


_logger = logging.getLogger("hybridlm.ops.gated_delta_rule")
_ANNOUNCED: set[tuple[str, str]] = set()


def note_backend_choice(name: str, q: torch.Tensor) -> None:
    """Log the backend once per (backend, device type); warn when a CUDA call runs a PyTorch path.

    Skipped while torch.compile traces (its guards would break on the bookkeeping).
    """
    if torch.compiler.is_compiling():
        return
    key = (name, q.device.type)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    _logger.info("gated_delta_rule: %r backend for %s tensors", name, q.device.type)
    if q.is_cuda and name in ("chunk", "recurrent") and q.dtype != torch.float64:
        why = "Triton is not installed (pip install triton)" if not TRITON_AVAILABLE else f"impl={name!r} was asked for"
        warnings.warn(
            f"gated_delta_rule is running its PyTorch {name!r} path on a CUDA tensor ({why}); this is several "
            f"times slower than the Triton kernels (impl='auto')",
            RuntimeWarning,
            stacklevel=3,
        )


def register_gpu_backends(register_backend) -> None:
    """Add "triton-split" (auto's choice on CUDA), "triton" (the same) and "fla" (by name only) to the dispatcher."""
    register_backend("triton-split", triton_split_gated_delta_rule, priority=20, prefers=prefers_triton)
    register_backend("triton", triton_split_gated_delta_rule, priority=-1, prefers=lambda q, needs_grad: False)
    register_backend("fla", fla_gated_delta_rule, priority=-1, prefers=lambda q, needs_grad: False)
