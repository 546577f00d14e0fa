"""Gated delta rule (Gated DeltaNet's token mixer): the public op, its implementations and reference.

- `gated_delta_rule`: checks inputs and dispatches to a backend (`impl="auto" | "chunk" | "recurrent"`).
- `chunk_gated_delta_rule`: chunked WY/UT form with a hand-written backward (training, prefill).
- `recurrent_gated_delta_rule`: token by token (decoding).
- `naive_gated_delta_rule`: float64 plain-loop reference for tests.
"""

from hybridlm.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from hybridlm.ops.gated_delta_rule.dispatch import available_impls, gated_delta_rule, register_backend
from hybridlm.ops.gated_delta_rule.recurrent import recurrent_gated_delta_rule
from hybridlm.ops.gated_delta_rule.reference import naive_gated_delta_rule

__all__ = [
    "available_impls",
    "chunk_gated_delta_rule",
    "gated_delta_rule",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "register_backend",
]
