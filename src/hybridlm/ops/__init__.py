"""Operators: plain functions on tensors, each with a reference implementation beside the fast path."""

from hybridlm.ops.gated_delta_rule import gated_delta_rule
from hybridlm.ops.lm_loss import fused_lm_loss_sums

__all__ = ["fused_lm_loss_sums", "gated_delta_rule"]
