"""Triton kernels for the small fused operators of the GDN layer (GPU; CPU under TRITON_INTERPRET=1).

- `causal_conv1d_triton` / `causal_conv1d_update_`: depthwise causal short conv + SiLU, with
  packed documents, a conv cache, and an in-place one-token decode step.
- `gated_rms_norm_triton`: RMSNorm(x) * weight * silu(gate) in float32.

`hybridlm.ops.conv.causal_conv1d` and `hybridlm.ops.norm.gated_rms_norm` dispatch here for CUDA
tensors; their PyTorch bodies are the references the tests compare with.
"""

from hybridlm.ops.triton.conv import causal_conv1d_triton, causal_conv1d_update_
from hybridlm.ops.triton.norm import gated_rms_norm_triton

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_", "gated_rms_norm_triton"]
