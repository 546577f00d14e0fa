"""(b) A GDN layer tracks the pointers of a program through swaps, as products of Householder reflections.

Task: `state_tracking` from hybridlm.tasks in swap mode, token form (one token per integer):

    a , b , c , d , e = 3 , 0 , 7 , 1 , 6 \\n      the init line: pointer j starts at value v_j
    a , c = c , a \\n                               n swap lines `x , y = y , x` (x before y)
    ...
    assert a ==                                    answer: the current value of a (an index token)

Model: HybridLM with layer_kinds ["gdn", "gdn"] (4 GDN heads per layer, key_head_dim = max(k, 2),
value_head_dim = max(k + 1, 2P + 1) with P the index-code planes of `programs`).

Layer 2, the tracker (head 0), holds one state row per pointer: S = sum_j e_j r_j^T with r_j the index
code of pointer j's current value (CODE_OFFSET + F(value), plus a reference channel CODE_OFFSET). Three
kinds of updates, each one delta-rule step S <- (I - beta k k^T) S + beta k v^T (no decay):

- Init writes. At the j-th value token of the init line: key e_j, beta = 1, value = the token's own
  code r: row j is replaced by r exactly, whatever it held before.
- Swaps. A swap of rows x and y is the reflection I - 2 u u^T with u = (e_x - e_y)/sqrt(2), but the short
  conv ends in a SiLU, so keys cannot have negative entries. The tracker therefore makes each swap out
  of three reflections with nonnegative keys, all with beta = 2 and value 0:

      at `=`  (window x , y =): key (e_x + e_y)/sqrt(2)   maps (r_x, r_y) -> (-r_y, -r_x)
      at `y`  (window , y = y): key e_y                    -> (-r_y,  r_x)
      at `x`  (window = y , x): key e_x                    -> ( r_y,  r_x)

  In the plane of e_x, e_y this is H_x H_y H_mid = (-I) H_mid = I - 2 u u^T, u = (e_x - e_y)/sqrt(2);
  every other row is orthogonal to all three keys and untouched, so the line swaps rows x and y exactly.
  Each transition has the eigenvalue -1: without negative eigenvalues (beta <= 1) none is possible.
- Every other token: key exactly 0, an exact identity step.

Readout: at `==` the query is e_x for the asked pointer x (the pointer one or two tokens back), so
o = S^T e_x / sqrt(d_k) = r_x / sqrt(d_k); the gated RMSNorm keeps its direction and o_proj writes
(code - reference) = lambda F(value of x), lambda > 0, to the residual features `addr:<f>:<c>`. The LM
head scores index token d by <F(d), addr>: P lambda for the right value, at most (P - gap) lambda for
any other (`programs`: gap >= 0.158), 0 for tokens that are not indices.

Layer 1 supplies what the tracker's keys, queries and gates need, as residual features. It writes them
at CONTEXT_SCALE = 1e-3 (the tracker's weights divide by it): next to the embedding (norm ~10) they then
leave layer 2's input RMSNorm factor constant to ~1e-8, as if layer 2 read the embedding alone.

- Window heads 0..2: decay 0 and key = query = e_0 at every token, so S_t = e_0 v_t^T and o_t = v_t /
  sqrt(d_k): the head outputs its own conv output. Its value channels are one-hot indicators of the
  token `lag` positions back (conv weight 1 on that lag only): pointer j (`prev<lag>:ptr:<j>`, lags 1,
  2, 3) and the `=` sign (`prev1:=`, `prev3:=`). Layer 2 thus sees the 4-token window x_(t-3) .. x_t
  as separate indicators and can AND them with one SiLU.
- The ordinal head 3 counts the values of the init line: a 2-dim key space where pointer tokens write
  row 0 = c e_0 and `=` writes row 1 = c e_1 (beta = 1); then every index token reflects along e_0 and
  every comma along (cos phi, sin phi), phi = pi / ORDINAL_PERIOD (beta = 2, value 0). A comma-then-value
  pair is the rotation by w = 2 phi, so at the j-th value the head reads c (-cos(j w), sin(j w))
  (`ord:0`, `ord:1`, unit length; the gate is open at index tokens only).

The tracker's key for pointer channel j is one thresholded linear function of these indicators, with
A = SATURATION and KEY_WEIGHTS (indicators are 0/1):

    p_j / A = 2 [x_t = j] + 2.5 [x_t is =] + 1.25 [x_(t-1) is =] + 1.25 [x_(t-3) is =]
              + 0.75 [x_(t-1) = j] + 0.75 [x_(t-3) = j] - 3
              + [x_t is an index] (2.375 - (G/A) c0) + (G/A) <ord, P_j>,      P_j = (-cos(j w), sin(j w))

Over every window that occurs in these programs, the first line reaches +0.25 exactly at the three swap
updates (x_t = j after `=`: 2 + 1.25; x_t = j three after `=`: 2 + 1.25; x_t is `=` with j one or three
back: 2.5 + 0.75, the same for x and y, so the mid key has two equal entries) and is <= -0.25 elsewhere
(e.g. 2 + 0.75 = 2.75 for `assert x` after a line ending in x; 0.75 + 0.75 for `, y = y ,`). At index
tokens the first two lines give -0.625 or +0.625 and G <ord, P_j> - G c0 adds +G m for the ordinal j and
<= -G m for the others (c0 = (1 + cos w)/2, m = (1 - cos w)/2, G m = 1.5 A): so exactly channel j fires.
Negative pre-activations are >= 0.25 A in size, so the SiLU makes them exact zeros. Keys also fire at
the init line's `=` and at index tokens of other lines (with whatever the counter shows there); those
only touch rows that the init writes replace afterwards. Rows >= k are never touched.

Exactness and margins. Every key is an exact one-hot or an equal pair (its L2 normalisation is e_j or
(e_x + e_y)/sqrt(2) up to one rounding), beta is exactly 1 or 2 and there is no decay, so each swap is
an orthogonal map up to O(1e-7) (float32) and errors grow at most linearly: after n = 10^4 swap lines
(3 * 10^4 reflections) a row deviates by at most ~3e-3 of its norm (measured with the chunked operator:
1.0e-4 in float32, 5e-8 in float64). Decoding needs the right index to beat every other by gap lambda
against P lambda of signal: a relative margin of gap / P (0.059 for m <= 2520, 0.032 for m <= 16384),
hundreds of times the accumulated error. Answers are therefore exact in float32.

Scope: swap lines only (the task's default mode). Permute-mode lines assign a permutation of up to k
pointers at once, which a fixed 4-token window cannot decompose into transpositions; the builder
refuses them with a ValueError.
"""

from __future__ import annotations

import math

import torch

from hybridlm.models import HybridConfig, HybridLM
from hybridlm.nn.blocks import GatedDeltaNetBlock
from hybridlm.tasks import StateTracking
from hybridlm.tasks.state_recall import POINTER_NAMES
from hybridlm.theory.programs import (
    CODE_OFFSET,
    NON_INDEX_CLASSES,
    code_feature,
    code_planes,
    embedding_features,
    embedding_rows,
    index_code,
)
from hybridlm.theory.wiring import (
    ROTATION_KEY_SCALE,
    SATURATION,
    Features,
    GDNHead,
    blank_model,
    finalize,
    gated_output_magnitude,
    input_scale,
    set_embedding,
    set_lm_head,
)

ORDINAL_PERIOD = 32  # the ordinal counter distinguishes positions 0..31 of the init line (k <= 26)
WINDOW_LAGS = (1, 2, 3)
CONTEXT_HEADS = 4  # window heads for lags 1, 2, 3 and the ordinal counter
# Context features (window indicators, ordinal) are written at this size, small next to the embedding
# (norm ~10), so the next layer's input RMSNorm factor stays constant to ~1e-8 relative; their readers
# divide by it.
CONTEXT_SCALE = 1e-3
# The tracker key's weights per indicator (times SATURATION); see the module docstring for the table.
KEY_WEIGHTS = {"cur=j": 2.0, "cur==": 2.5, "prev1==": 1.25, "prev3==": 1.25, "prev1=j": 0.75, "prev3=j": 0.75,
               "threshold": 3.0, "index": 2.375}


def window_features(pointers: int) -> list[str]:
    names = []
    for lag in WINDOW_LAGS:
        names += [f"prev{lag}:ptr:{j}" for j in range(pointers)]
        if lag != 2:
            names.append(f"prev{lag}:=")
    return names


def ordinal_point(j: int) -> tuple[float, float]:
    angle = 2.0 * math.pi * j / ORDINAL_PERIOD
    return (-math.cos(angle), math.sin(angle))


def addr_features(planes: int) -> list[str]:
    return [f"addr:{f}:{c}" for f in range(planes) for c in range(2)]


def check_swap_program(task, pointers: int) -> None:
    """Raise ValueError if the task's programs are outside what the tracker handles."""
    if task.knobs["mode"] != "swap":
        raise ValueError(
            f"the tracking construction handles swap lines (`x , y = y , x`) only; got mode="
            f"{task.knobs['mode']!r}. Use mode='swap' (the task default)"
        )
    if not 2 <= pointers <= len(POINTER_NAMES):  # and < ORDINAL_PERIOD, which 26 letters guarantee
        raise ValueError(f"the tracking construction needs 2 <= k <= {len(POINTER_NAMES)} pointers; got k={pointers}")


def wire_window_heads(block: GatedDeltaNetBlock, features: Features, first_head: int, pointers: int,
                      scale: float, eps: float) -> None:
    """Heads first_head + 0..2 output one-hot indicators of the tokens 1, 2 and 3 positions back."""
    for offset, lag in enumerate(WINDOW_LAGS):
        head = GDNHead(block, first_head + offset, features)
        head.query(0, {"const": SATURATION})
        head.key(0, {"const": SATURATION})
        head.beta({})  # b = 0: beta = 1, a plain overwrite of the (reset) state
        head.reset_where({"const": SATURATION})  # decay 0 at every token: the state is this token's write
        head.gate({"const": SATURATION})
        # One nonzero value entry of size SATURATION * scale, read back through q = k = e_0.
        raw = SATURATION * scale / math.sqrt(head.key_dim)
        unit = 1.0 / gated_output_magnitude(raw, head.value_dim, SATURATION * scale, eps)
        channels = [(f"ptr:{j}", f"prev{lag}:ptr:{j}") for j in range(pointers)]
        if lag != 2:
            channels.append(("tok:=", f"prev{lag}:="))
        for channel, (source, target) in enumerate(channels):
            head.value(channel, {source: SATURATION}, lags={lag: 1.0})
            head.output(channel, {target: CONTEXT_SCALE * unit})


def wire_ordinal_head(block: GatedDeltaNetBlock, features: Features, head_index: int,
                      scale: float, eps: float) -> None:
    """The init-line ordinal counter (features ord:0, ord:1 at index tokens)."""
    head = GDNHead(block, head_index, features)
    phi = math.pi / ORDINAL_PERIOD
    key = ROTATION_KEY_SCALE
    head.key(0, {"ptr": key, "digit": key, "tok:,": key * math.cos(phi)})
    head.key(1, {"tok:=": key, "tok:,": key * math.sin(phi)})
    head.value(0, {"ptr": SATURATION})  # pointer tokens write row 0 = c e_0
    head.value(1, {"tok:=": SATURATION})  # `=` writes row 1 = c e_1
    head.beta({"digit": SATURATION, "tok:,": SATURATION})  # reflections (beta 2) at values and commas
    head.query(0, {"const": SATURATION})
    head.gate({"digit": 2 * SATURATION, "const": -SATURATION})
    raw = SATURATION * scale / math.sqrt(head.key_dim)
    unit = 1.0 / gated_output_magnitude(raw, head.value_dim, SATURATION * scale, eps)
    head.output(0, {"ord:0": CONTEXT_SCALE * unit})
    head.output(1, {"ord:1": CONTEXT_SCALE * unit})


def wire_tracker_head(block: GatedDeltaNetBlock, features: Features, head_index: int, pointers: int,
                      planes: int) -> None:
    """The pointer tracker: state rows = index codes of the pointers' values; reads `addr` at `==`."""
    head = GDNHead(block, head_index, features)
    a = SATURATION
    step = 2.0 * math.pi / ORDINAL_PERIOD
    c0 = (1.0 + math.cos(step)) / 2.0
    g = 1.5 * a / ((1.0 - math.cos(step)) / 2.0)
    w = KEY_WEIGHTS
    context = a / CONTEXT_SCALE  # weight of a context feature worth one indicator
    for j in range(pointers):
        x, y = ordinal_point(j)
        head.key(j, {
            f"ptr:{j}": w["cur=j"] * a, "tok:=": w["cur=="] * a, "const": -w["threshold"] * a,
            "prev1:=": w["prev1=="] * context, "prev3:=": w["prev3=="] * context,
            f"prev1:ptr:{j}": w["prev1=j"] * context, f"prev3:ptr:{j}": w["prev3=j"] * context,
            "digit": w["index"] * a - g * c0, "ord:0": g * x / CONTEXT_SCALE, "ord:1": g * y / CONTEXT_SCALE,
        })
        head.query(j, {f"prev1:ptr:{j}": context, f"prev2:ptr:{j}": context})
    reference = 2 * planes
    for f in range(planes):
        for c in range(2):
            head.value(2 * f + c, {code_feature(f, c): SATURATION})
    head.value(reference, {"digit": SATURATION * CODE_OFFSET})
    # beta = 2 except at index tokens, where b is a sum of exact zeros: beta = 2 sigmoid(0) = 1 exactly.
    # (b = const - digit would not do: GEMM accumulates with fused multiply-adds, so x - x != 0 there.)
    head.beta({name: SATURATION for name in NON_INDEX_CLASSES})
    head.gate({"tok:==": 2 * SATURATION, "const": -SATURATION})
    # Entries of the normed output are about sqrt(d_v) * silu(gate) / sqrt(d_v) per unit of code; this
    # keeps `addr` of order 1 (its exact positive scale does not matter).
    unit = 1.0 / (math.sqrt(head.value_dim) * SATURATION)
    for name in addr_features(planes):
        f, c = map(int, name.split(":")[1:])
        head.output(2 * f + c, {name: unit})
    head.output(reference, {name: -unit for name in addr_features(planes)})


def program_config(vocab_size: int, features: Features, layer_kinds: list[str], *, gdn_heads: int,
                   key_dim: int, value_dim: int, head_dim: int = 1, max_seq_len: int) -> HybridConfig:
    return HybridConfig(
        vocab_size=vocab_size,
        d_model=len(features),
        n_layers=len(layer_kinds),
        layer_kinds=layer_kinds,
        n_heads=1,
        head_dim=head_dim,
        mlp_hidden=1,
        gdn_key_heads=gdn_heads,
        gdn_value_heads=gdn_heads,
        gdn_key_head_dim=key_dim,
        gdn_value_head_dim=value_dim,
        max_seq_len=max_seq_len,
        pad_token_id=0,
        eos_token_id=None,
    )


def build_tracking_model(task: StateTracking, *, dtype: torch.dtype = torch.float32,
                         max_seq_len: int = 1 << 20) -> HybridLM:
    """The two-GDN-layer pointer-tracking model for `task` (state_tracking, swap mode).

    The argmax logit at the `==` position is the index token of the asked pointer's final value.
    """
    if not isinstance(task, StateTracking):
        raise ValueError(f"build_tracking_model needs a StateTracking task; got {type(task).__name__}")
    pointers = task.knobs["k"]
    check_swap_program(task, pointers)
    planes = code_planes(task.knobs["max_bits"])
    features = Features([*embedding_features(pointers, planes), *window_features(pointers), "ord:0", "ord:1",
                         *addr_features(planes), "filler"])
    config = program_config(task.vocab_size, features, ["gdn", "gdn"], gdn_heads=CONTEXT_HEADS,
                            key_dim=max(pointers, 2), value_dim=max(pointers + 1, 2 * planes + 1),
                            max_seq_len=max_seq_len)
    model = blank_model(config)
    norm = set_embedding(model, features, embedding_rows(task.vocab.tokens, pointers, planes))
    scale = input_scale(norm, config)
    context, tracker = model.model.layers
    wire_window_heads(context, features, 0, pointers, scale, config.gdn_norm_eps)
    wire_ordinal_head(context, features, 3, scale, config.gdn_norm_eps)
    wire_tracker_head(tracker, features, 0, pointers, planes)
    set_lm_head(model, features, {
        task.vocab.id(str(value)): {f"addr:{f}:{c}": code[c] for f, code in enumerate(index_code(value, planes))
                                    for c in range(2)}
        for value in range(task.knobs["max_bits"])
    })
    return finalize(model, dtype)
