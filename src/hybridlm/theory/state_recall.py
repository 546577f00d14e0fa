"""(d) A GDN -> attention stack solves state-based recall (the paper's Theorem 1, constructively).

Task: `state_recall` from hybridlm.tasks in swap mode, token form

    bits = [ b0 , ... , b(m-1) ] \\n                   the bit list
    a , b , c , d , e = v0 , v1 , v2 , v3 , v4 \\n    the init line
    x , y = y , x \\n   (n lines)                       swaps
    assert bits [ x ] ==                               answer: bits[final value of x]

Model: HybridLM with layer_kinds ["gdn", "gdn", "attn"]: one alternation from GDN to attention.

- GDN layer 1 (context): the window heads and the init-line ordinal counter of `tracking`.
- GDN layer 2 (tracking): the tracker head of `tracking`. Its state rows are the index codes of the
  pointers' values; each swap line is three reflections (beta = 2) whose product is the transposition
  of two rows. At `==` (window `[ x ] ==`, the pointer two back) it reads row x and writes
  addr = lambda F(value of x) to the residual: the address, as the theorem's sketch puts it.
  Beside it, the bit-index counters of `retrieval` (F(i) at the i-th bit of the list, zero elsewhere).
  They need no context, so they could sit in either GDN layer; in layer 2 they share its heads with
  the tracker (HybridConfig gives every GDN layer the same head count). Their short-conv detectors
  and their rotations assume a constant input RMS factor, which holds because layer 1 writes its
  context features at CONTEXT_SCALE = 1e-3 next to an embedding of norm ~10.
- Attention (recall): the retrieval head of `retrieval`: query = addr, keys = the bit-index codes of
  the list's bits, value = the bit. The address is known only at the end, and the bit list has m
  entries: the attention recalls it exactly, which a fixed-size recurrent state could not do for all m.

Bit-list tokens reach the tracker too (their index tokens get ordinal keys from a counter that is not
aligned there); they only write rows that the init line then overwrites (beta = 1 writes replace a row).
The margins are those of `tracking` (the tracker's rows stay within ~1e-4 of the exact codes after 10^4
swap lines in float32) and `retrieval` (the code gap makes the attention logit gap 1000 for an exact
address, so weight exactly 1 falls on the addressed bit; a 1e-4 error in the address moves the logits
by ~1e-4 of the match logit w^2 sqrt(2P) ~ 4e4, i.e. by ~4); see those modules for the derivations.

Scope: swap-mode lines, as in `tracking`.
"""

from __future__ import annotations

import torch

from hybridlm.models import HybridLM
from hybridlm.tasks import StateBasedRecall
from hybridlm.theory.programs import code_planes, embedding_features, embedding_rows
from hybridlm.theory.retrieval import (
    bit_index_features,
    set_bit_lm_head,
    wire_bit_index_heads,
    wire_retrieval_attention,
)
from hybridlm.theory.tracking import (
    CONTEXT_HEADS,
    addr_features,
    check_swap_program,
    program_config,
    window_features,
    wire_ordinal_head,
    wire_tracker_head,
    wire_window_heads,
)
from hybridlm.theory.wiring import Features, blank_model, finalize, input_scale, set_embedding


def build_state_recall_model(task: StateBasedRecall, *, dtype: torch.dtype = torch.float32,
                             max_seq_len: int = 1 << 20) -> HybridLM:
    """The GDN -> GDN -> attention model for `task` (state_recall, swap mode): argmax at `==` is the bit."""
    if not isinstance(task, StateBasedRecall):
        raise ValueError(f"build_state_recall_model needs a StateBasedRecall task; got {type(task).__name__}")
    pointers = task.knobs["k"]
    check_swap_program(task, pointers)
    planes = code_planes(task.knobs["max_bits"])
    features = Features([
        *embedding_features(pointers, planes), *window_features(pointers), "ord:0", "ord:1",
        *bit_index_features(planes), *addr_features(planes), "ans", "filler",
    ])
    config = program_config(
        task.vocab_size, features, ["gdn", "gdn", "attn"], gdn_heads=max(CONTEXT_HEADS, 1 + planes),
        key_dim=max(pointers, 2), value_dim=max(pointers + 1, 2 * planes + 1), head_dim=2 * planes,
        max_seq_len=max_seq_len,
    )
    model = blank_model(config)
    norm = set_embedding(model, features, embedding_rows(task.vocab.tokens, pointers, planes))
    # Layer 2's input is the embedding plus context features of size ~CONTEXT_SCALE: the same factor.
    scale = input_scale(norm, config)
    context, tracker, attention = model.model.layers
    wire_window_heads(context, features, 0, pointers, scale, config.gdn_norm_eps)
    wire_ordinal_head(context, features, 3, scale, config.gdn_norm_eps)
    wire_tracker_head(tracker, features, 0, pointers, planes)
    wire_bit_index_heads(tracker, features, 1, planes, scale, config.gdn_norm_eps)
    wire_retrieval_attention(attention, features, planes)
    set_bit_lm_head(model, features, task)
    return finalize(model, dtype)
