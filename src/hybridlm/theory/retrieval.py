"""(c) An attention layer retrieves bits[i] given i.

Task: `bit_recall` from hybridlm.tasks, token form

    bits = [ b0 , b1 , ... , b(m-1) ] \\n assert bits [ i ] ==        answer: b_i (the token "0" or "1")

Model: HybridLM with layer_kinds ["gdn", "attn"]. The model has no positional encoding (NoPE) and a bit
token does not know its index, so the GDN layer supplies the two index codes (`programs`, P planes)
the attention needs; the retrieval itself is one attention head.

GDN layer, bit-index heads f = 0..P-1 (the counters). Key space 2-dim. At `bits` (first token only)
the head writes row 0 = c e_0 and at the `=` right after it row 1 = c e_1 (beta = 1), so S = c I. Then
every bit token reflects along e_0 and every comma along (cos phi_f, sin phi_f), phi_f = pi / p_f
(beta = 2, value 0; both keys are nonnegative, as the conv's SiLU requires). A comma-then-bit pair is
the rotation by w_f = 2 phi_f = 2 pi / p_f, so at bit i the state is H_0 R(i w_f) c and the query e_0
reads its row 0, c (-cos(i w_f), sin(i w_f)) = c F_f(i). The gate is open at index tokens only; o_proj writes F_f(i)
(unit vectors) to `bitidx:<f>:<c>`. A line break resets the state (decay 0), and the short conv makes
the two writes conditional on their context (value channel 0 = 3[bits] - 2 at lags 0 and 1: > 0 only
for `bits` at position 0; channel 1 = 2[bits] + 5[=] - 3 at lags 0 and 1: > 0 only for `=` right after
`bits`; every other window is <= -1, in units of SATURATION). So the counters are zero outside the bit
list, and the attention keys there are exactly 0.

GDN layer, literal head P: decay 0 and key = query = e_0 at every token, so the head outputs its conv
output; its value channels read the index code of the token two back (lag 2), and its gate is open at
`==` only: at `==` (window `[ i ] ==`) o_proj writes (code - offset) = lambda F(i) to `addr:<f>:<c>`.

Attention layer, one head of dimension 2P: q = addr, k = bitidx, v = `bit` (+1 for "1", -1 for "0").
With the QK-norm weight w on every channel, q and k become sqrt(2) w F, and the logit of bit i' for the
query index i is

    2 w^2 <F(i), F(i')> / sqrt(2P) = w^2 sqrt(2P)                          if i' = i,
                                    <= w^2 sqrt(2P) - 2 w^2 gap / sqrt(2P)     otherwise,

and 0 for every token without a key. w is set so that the gap 2 w^2 gap / sqrt(2P) is 1000: exp(-1000)
is exactly 0 in float32 and float64, so the softmax puts weight exactly 1 on b_i and the attention
output is exactly +-1. The post-attention RMSNorm keeps its sign in the residual feature `ans`; the LM
head gives logit("1") = ans, logit("0") = -ans (times the final norm's positive factor), others 0.

Exactness: the counters' rotations accumulate float32 rounding errors (measured: < 1e-5 rad per plane
after 16000 bits), which move <F(i), F(i')> by far less than the code's gap (>= 0.158): the retrieved
bit is always b_i.
"""

from __future__ import annotations

import math

import torch

from hybridlm.models import HybridLM
from hybridlm.nn.blocks import AttentionBlock, GatedDeltaNetBlock
from hybridlm.tasks import BitRecall
from hybridlm.theory.programs import (
    CODE_OFFSET,
    MODULI,
    code_feature,
    code_gap,
    code_planes,
    embedding_features,
    embedding_rows,
)
from hybridlm.theory.tracking import addr_features, program_config
from hybridlm.theory.wiring import (
    ROTATION_KEY_SCALE,
    SATURATION,
    AttentionHead,
    Features,
    GDNHead,
    blank_model,
    finalize,
    gated_output_magnitude,
    input_scale,
    set_embedding,
    set_lm_head,
)

LOGIT_GAP = 1000.0  # attention logit gap between the matching bit and any other: exp(-1000) == 0


def bit_index_features(planes: int) -> list[str]:
    return [f"bitidx:{f}:{c}" for f in range(planes) for c in range(2)]


def wire_bit_index_heads(block: GatedDeltaNetBlock, features: Features, first_head: int, planes: int,
                         scale: float, eps: float) -> None:
    """Heads first_head + f (f < planes) write F_f(i) to `bitidx:<f>:*` at the i-th bit of the bit list."""
    for f in range(planes):
        head = GDNHead(block, first_head + f, features)
        phi = math.pi / MODULI[f]  # half the rotation per bit
        key = ROTATION_KEY_SCALE
        head.key(0, {"tok:bits": key, "digit": key, "tok:,": key * math.cos(phi)})
        head.key(1, {"tok:=": key, "tok:,": key * math.sin(phi)})
        # Writes only at the program's first token (`bits`) and at the `=` right after it.
        head.value(0, {"tok:bits": 3 * SATURATION, "const": -2 * SATURATION}, lags={0: 1.0, 1: 1.0})
        head.value(1, {"tok:bits": 2 * SATURATION, "tok:=": 5 * SATURATION, "const": -3 * SATURATION},
                   lags={0: 1.0, 1: 1.0})
        head.beta({"digit": SATURATION, "tok:,": SATURATION})  # reflections at bits and commas
        head.reset_where({"tok:newline": 2 * SATURATION, "const": -SATURATION})
        head.query(0, {"const": SATURATION})
        head.gate({"digit": 2 * SATURATION, "const": -SATURATION})
        raw = SATURATION * scale / math.sqrt(head.key_dim)
        unit = 1.0 / gated_output_magnitude(raw, head.value_dim, SATURATION * scale, eps)
        head.output(0, {f"bitidx:{f}:0": unit})
        head.output(1, {f"bitidx:{f}:1": unit})


def wire_literal_head(block: GatedDeltaNetBlock, features: Features, head_index: int, planes: int) -> None:
    """At `==`, write the index code of the token two back (the literal i of `[ i ] ==`) to `addr`."""
    head = GDNHead(block, head_index, features)
    head.query(0, {"const": SATURATION})
    head.key(0, {"const": SATURATION})
    head.beta({})  # beta = 1
    head.reset_where({"const": SATURATION})  # decay 0: the head outputs this token's conv output
    reference = 2 * planes
    for f in range(planes):
        for c in range(2):
            head.value(2 * f + c, {code_feature(f, c): SATURATION}, lags={2: 1.0})
    head.value(reference, {"digit": SATURATION * CODE_OFFSET}, lags={2: 1.0})
    head.gate({"tok:==": 2 * SATURATION, "const": -SATURATION})
    unit = 1.0 / (math.sqrt(head.value_dim) * SATURATION)
    for name in addr_features(planes):
        f, c = map(int, name.split(":")[1:])
        head.output(2 * f + c, {name: unit})
    head.output(reference, {name: -unit for name in addr_features(planes)})


def wire_retrieval_attention(block: AttentionBlock, features: Features, planes: int) -> None:
    """One head: query `addr`, keys `bitidx`, value = the bit (+1 / -1), written to `ans`."""
    head = AttentionHead(block, 0, features)
    for f in range(planes):
        for c in range(2):
            head.query(2 * f + c, {f"addr:{f}:{c}": 1.0})
            head.key(2 * f + c, {f"bitidx:{f}:{c}": 1.0})
    head.value(0, {"bit": 1.0})
    head.output(0, {"ans": 1.0})
    weight = math.sqrt(LOGIT_GAP * math.sqrt(2 * planes) / (2.0 * code_gap(planes)))
    head.qk_norm_weights(weight, weight)


def set_bit_lm_head(model: HybridLM, features: Features, task) -> None:
    set_lm_head(model, features, {task.vocab.id("1"): {"ans": 1.0}, task.vocab.id("0"): {"ans": -1.0}})


def build_bit_recall_model(task: BitRecall, *, dtype: torch.dtype = torch.float32,
                           max_seq_len: int = 1 << 20) -> HybridLM:
    """The GDN -> attention model for `task` (bit_recall): the argmax at `==` is bits[i]."""
    if not isinstance(task, BitRecall):
        raise ValueError(f"build_bit_recall_model needs a BitRecall task; got {type(task).__name__}")
    planes = code_planes(task.knobs["max_bits"])
    features = Features([*embedding_features(0, planes), *bit_index_features(planes), *addr_features(planes),
                         "ans", "filler"])
    config = program_config(task.vocab_size, features, ["gdn", "attn"], gdn_heads=planes + 1, key_dim=2,
                            value_dim=2 * planes + 1, head_dim=2 * planes, max_seq_len=max_seq_len)
    model = blank_model(config)
    norm = set_embedding(model, features, embedding_rows(task.vocab.tokens, 0, planes))
    scale = input_scale(norm, config)
    gdn, attention = model.model.layers
    wire_bit_index_heads(gdn, features, 0, planes, scale, config.gdn_norm_eps)
    wire_literal_head(gdn, features, planes, planes)
    wire_retrieval_attention(attention, features, planes)
    set_bit_lm_head(model, features, task)
    return finalize(model, dtype)
