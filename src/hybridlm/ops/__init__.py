"""Operators: plain functions on tensors, each with a reference implementation beside the fast path."""

from hybridlm.ops.gated_delta_rule import gated_delta_rule

__all__ = ["gated_delta_rule"]
