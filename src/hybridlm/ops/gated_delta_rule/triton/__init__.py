"""Triton kernels for the gated delta rule on GPUs (Hopper first; any GPU Triton supports).

- `chunk_gated_delta_rule_triton_split` (also `chunk_gated_delta_rule_triton`): chunked forward and
  backward (training, prefill) with split-bf16 matmuls (backends "triton-split" and "triton",
  auto's choice on GPUs; `chunk_split.py`).
- `recurrent_gated_delta_rule_triton`: token-by-token forward (decoding, short prompts).
- `gated_delta_rule_decode_`: one decoding step that advances a state tensor in place.
- `backend`: the dispatcher's GPU backends ("triton-split" = "triton", "fla"); importing it does not
  import Triton.

The kernels run on CUDA tensors, or on CPU under `TRITON_INTERPRET=1` (how CI tests them).
Names are imported lazily, so `import hybridlm.ops.gated_delta_rule` works without Triton.
"""

_LAZY = {
    "SPLIT_OPTIONS": "chunk_split",
    "chunk_gated_delta_rule_triton_split": "chunk_split",
    "chunk_gated_delta_rule_triton": "chunk_split",
    "gated_delta_rule_decode_": "chunk",
    "recurrent_gated_delta_rule_triton": "chunk",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
