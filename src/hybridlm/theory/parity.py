"""(a) One GDN layer with negative eigenvalues computes the parity of every prefix.

Task: `parity` from hybridlm.tasks, token form `x1 x2 ... xL =` over the vocabulary [<pad>, =, 0, 1]
(labels="prefix" asks for the parity of x1..xt at every position t; labels="final" asks once, at `=`).

Model: HybridLM with layer_kinds ["gdn"], one GDN head with key_head_dim = value_head_dim = 1.

The recurrence. With key k_t, beta_t and value v_t (all scalars here) the gated delta rule with no decay is

    S_t = (1 - beta_t k_t^2) S_{t-1} + beta_t k_t v_t.

At a 1-bit the weights give k = 1 (the L2-normalised key of a positive number), beta = 2 and v = c > 0:

    S_t = -S_{t-1} + 2c,   i.e.   S_t - c = -(S_{t-1} - c).

So the transition has eigenvalue -1 (a Householder reflection, beta = 2): the deviation S - c flips sign
at every 1-bit. At a 0-bit (and at `=`) the key is exactly 0, so the step is the identity. Starting from
the zero state, S_t - c = -c * (-1)^(number of ones), i.e. S_t = 0 after an even number of ones and
S_t = 2c after an odd number. The reflection centre c is what lets the zero initial state be a valid
"even" state without a separate initialising write. With beta <= 1 (no negative eigenvalues) the
factor (1 - beta k^2) would lie in [0, 1) and no fixed-precision state could alternate like this.

Readout. o_t = S_t (query 1) goes through the gated RMSNorm x -> x / sqrt(x^2 + eps) (d_v = 1,
eps = 1e-5) and o_proj writes it to the residual feature `parity`, scaled so that S = 2c gives 1; the
LM head compares it with 1/2: logit("1") = parity, logit("0") = 1/2 (times the positive final-norm
factor), others 0. The even state is 0 only up to rounding residues (~1e-7 of c), and the norm would
blow any residue up to +-1 if c were large. So c is small: the value pre-activation is
PARITY_VALUE_SCALE * (input scale) ~ 1e-3, c = silu(that) ~ 6e-4 (the same number at every 1-bit), and
2c ~ 1e-3 < sqrt(eps) ~ 3e-3, where the norm is nearly linear: residues stay residues.

Exactness. Every gate is saturated (see `wiring`): keys are exactly 0 at 0-bits, the L2-normalised key
at 1-bits is 1 up to one rounding, beta is exactly 2, the decay exactly 1. The state therefore stays
within a few ulps of {0, 2c}: the map S -> 2c k - k^2 S with k = 1 +- 1e-7 does not amplify errors
(|k^2| <= 1 + 2e-7 per step, so after L = 10^4 steps the deviation is at most ~L * 1e-7 * 2c relative,
about 2e-3 of c). The decision margin is 1/2 of the readout, so answers are exact in float32.
"""

from __future__ import annotations

import torch

from hybridlm.models import HybridConfig, HybridLM
from hybridlm.tasks import Parity
from hybridlm.theory.wiring import (
    SATURATION,
    Features,
    GDNHead,
    blank_model,
    finalize,
    gated_output_magnitude,
    input_scale,
    set_embedding,
    set_lm_head,
    silu,
)

FEATURES = ("const", "one", "parity", "filler")
PARITY_VALUE_SCALE = 1e-3  # keeps the state 2c below sqrt(eps) of the gated RMSNorm (see the docstring)


def build_parity_model(task: Parity, *, dtype: torch.dtype = torch.float32, max_seq_len: int = 1 << 20) -> HybridLM:
    """The one-GDN-layer parity model for `task`'s vocabulary (either label mode).

    Returns a HybridLM in `dtype` (eval mode) whose argmax logit at every supervised position is the
    parity of the bits read so far.
    """
    if not isinstance(task, Parity):
        raise ValueError(f"build_parity_model needs a Parity task; got {type(task).__name__}")
    features = Features(FEATURES)
    config = HybridConfig(
        vocab_size=task.vocab_size,
        d_model=len(features),
        n_layers=1,
        layer_kinds=["gdn"],
        n_heads=1,
        mlp_hidden=1,
        gdn_key_heads=1,
        gdn_value_heads=1,
        gdn_key_head_dim=1,
        gdn_value_head_dim=1,
        max_seq_len=max_seq_len,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = blank_model(config)
    one = task.vocab.id("1")
    rows = [{"const": 1.0, "one": 1.0} if token == one else {"const": 1.0} for token in range(task.vocab_size)]
    norm = set_embedding(model, features, rows)
    scale = input_scale(norm, config)  # every position's input RMSNorm factor

    head = GDNHead(model.model.layers[0], 0, features)
    head.query(0, {"const": SATURATION})
    head.key(0, {"one": SATURATION})  # k > 0 at 1-bits, exactly 0 elsewhere
    head.value(0, {"one": PARITY_VALUE_SCALE})  # the reflection centre c, used only where the key is nonzero
    head.beta({"const": SATURATION})  # beta = 2 everywhere (only 1-bits have a key)
    head.gate({"const": SATURATION})
    # The state is 0 or 2c; the gated RMSNorm of 2c is the magnitude below (its sign is +).
    state = 2.0 * silu(PARITY_VALUE_SCALE * scale)
    magnitude = gated_output_magnitude(state, 1, SATURATION * scale, config.gdn_norm_eps)
    head.output(0, {"parity": 1.0 / magnitude})

    set_lm_head(model, features, {one: {"parity": 1.0}, task.vocab.id("0"): {"const": 0.5}})
    return finalize(model, dtype)
