"""Hand-set weights that prove the expressivity constructions on our real layers.

Every construction is an ordinary `HybridLM` (built from a `HybridConfig`, run through its normal
forward with the chunked gated-delta-rule operator, and through the decoding cache) whose weights are
set by hand so that the argmax of its logits is the exact answer of an expressivity task from
`hybridlm.tasks`, on instances drawn by that task's own generator:

(a) `build_parity_model`         parity, every prefix       one GDN layer; beta = 2 reflections
(b) `build_tracking_model`       state_tracking (swaps)     GDN (context) -> GDN (tracker); a swap is a
                                                            product of three Householder reflections
(c) `build_bit_recall_model`     bit_recall                 GDN (index counters) -> attention (retrieval)
(d) `build_state_recall_model`   state_recall (swaps)       GDN -> GDN -> attention: one alternation,
                                                            the paper's Theorem 1 made concrete

Each module's docstring gives the math of its construction and the margins that make it exact;
`wiring` states the saturation rules shared by all of them and `programs` the index code.
`verify_constructions` / `hybridlm theory verify` run them on random instances.
"""

from hybridlm.theory.parity import build_parity_model
from hybridlm.theory.retrieval import build_bit_recall_model
from hybridlm.theory.state_recall import build_state_recall_model
from hybridlm.theory.tracking import build_tracking_model
from hybridlm.theory.verify import CONSTRUCTIONS, VerifyResult, format_table, verify_constructions

__all__ = [
    "CONSTRUCTIONS",
    "VerifyResult",
    "build_bit_recall_model",
    "build_parity_model",
    "build_state_recall_model",
    "build_tracking_model",
    "format_table",
    "verify_constructions",
]
