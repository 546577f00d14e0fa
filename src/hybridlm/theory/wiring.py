"""Setting the weights of real `HybridLM` layers by hand: named residual features, embeddings, and
writers for one GDN head or one attention head.

Every construction in `hybridlm.theory` is an ordinary `HybridLM` built from a `HybridConfig`; this module
only fills its parameters. Conventions shared by all constructions:

- The residual stream is a list of named features (`Features`); an embedding row, a projection row or an
  output column is written as a dict {feature name: weight}. Unused weights are exactly zero.
- Every MLP is zero (its down projection is zero, so the block adds exactly 0; in attention blocks the
  post-feed-forward RMSNorm of 0 is 0). All RMSNorm weights are 1 except where a construction says otherwise.
- All token embeddings get the same Euclidean norm (a `filler` feature pads the shorter rows), so the
  first layer's input RMSNorm multiplies every position by one constant `input_scale`. That matters where
  the short convolution adds several positions before its SiLU.
- Saturation. A pre-activation p feeding SiLU (conv output), sigmoid (beta), softplus (decay) or a SiLU
  gate is designed to be either exactly 0 (a sum of exact zeros: inputs that are 0, never x - x, since
  GEMM kernels accumulate with fused multiply-adds and x - x then leaves a rounding residue) or far
  from 0: |p| >= SATURATION / 4 * (input scale) >= 1000 (input scales are >= 0.4, checked by
  `input_scale`). In IEEE arithmetic silu(p) is then exactly p for p >= 37 and exactly 0 for
  p <= -745 (float64; the float32 thresholds are 17 and -104), 2 sigmoid(p) is exactly 2 for p >= 37
  and 2 sigmoid(0) exactly 1, exp(-softplus(p)) is exactly 0 for p >= 745 and softplus(p) exactly 0
  for p <= -745. So the gates are exact, not approximately right: beta in {1, 2}, decay in {0, 1},
  keys with exact zeros. (Parity's reflection centre is the one deliberately small value; see `parity`.)
- The RMSNorms (computed in float32 even in float64 models) only rescale; every decision is a sign or
  an argmax, invariant to a positive factor.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from hybridlm.models import HybridConfig, HybridLM
from hybridlm.nn.attention import Attention
from hybridlm.nn.blocks import AttentionBlock, GatedDeltaNetBlock
from hybridlm.nn.gated_deltanet import GatedDeltaNet

# Scale of every saturated pre-activation (before the input RMSNorm's factor): with logic margins of
# at least 1/4 and input scales of at least MIN_INPUT_SCALE, |p| >= 1000 > 745.
SATURATION = 1.0e4
MIN_INPUT_SCALE = 0.4
# Scale of keys whose direction matters, not just their support (the counters' rotation keys): keys are
# L2-normalised, so their scale is free, and every entry of (cos phi, sin phi) must pass the SiLU
# unchanged, i.e. be >= 37 (float64). The smallest is sin(pi / 32) ~ 0.098 (the ordinal counter) times
# the input scale >= 0.4: 1e7 leaves a factor of 10^4, so any rotation angle down to ~1e-5 would do.
ROTATION_KEY_SCALE = 1.0e7
# A_log of a head without decay: exp(-1e4) underflows to exactly 0 in float32 and float64, so the
# log decay g = -exp(A_log) * softplus(...) is exactly 0 and alpha = exp(g) exactly 1.
NO_DECAY_A_LOG = -1.0e4

Terms = Mapping[str, float]


class Features:
    """Named dimensions of the residual stream (d_model = number of names)."""

    def __init__(self, names: Iterable[str]):
        self.names: list[str] = list(names)
        self.index: dict[str, int] = {}
        for position, name in enumerate(self.names):
            if name in self.index:
                raise ValueError(f"feature {name!r} is listed twice; feature names must be unique")
            self.index[name] = position

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"no residual feature {name!r}; known features start with {self.names[:8]}") from None

    def vector(self, terms: Terms, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """[d_model] with the given weights at the named features, zeros elsewhere."""
        out = torch.zeros(len(self), dtype=dtype)
        for name, weight in terms.items():
            out[self[name]] += weight
        return out


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x)) if x > -700 else 0.0


def rms_scale(norm: float, dim: int, eps: float) -> float:
    """The factor RMSNorm applies to a vector of Euclidean norm `norm` in `dim` dimensions."""
    return 1.0 / math.sqrt(norm * norm / dim + eps)


def input_scale(embedding_norm: float, config: HybridConfig) -> float:
    """The first layer's input RMSNorm factor for embeddings of norm `embedding_norm`, checked to be
    large enough for the saturation margins (see the module docstring)."""
    scale = rms_scale(embedding_norm, config.d_model, config.norm_eps)
    if scale < MIN_INPUT_SCALE:
        raise ValueError(
            f"input RMS factor {scale:.3f} is below {MIN_INPUT_SCALE}: the embedding (norm {embedding_norm:.1f} "
            f"in {config.d_model} dims) is too large for the saturation margins; this construction does not "
            f"support these sizes"
        )
    return scale


def blank_model(config: HybridConfig) -> HybridLM:
    """A float64 `HybridLM` of `config` with every parameter zero, norm weights 1 and no decay anywhere."""
    model = HybridLM(config).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("A_log"):
                param.fill_(NO_DECAY_A_LOG)
            else:
                param.zero_()
    return model


def set_embedding(model: HybridLM, features: Features, rows: list[Terms], filler: str = "filler") -> float:
    """Write one embedding row per token id, padding each with `filler` to a common norm.

    Returns the common norm R of the rows. The first layer's RMSNorm then scales every token by
    rms_scale(R, d_model, norm_eps).
    """
    if len(rows) != model.config.vocab_size:
        raise ValueError(f"need one embedding row per token: got {len(rows)} rows for vocab_size "
                         f"{model.config.vocab_size}")
    vectors = [features.vector(row) for row in rows]
    if any(float(v[features[filler]]) != 0.0 for v in vectors):
        raise ValueError(f"rows must not set the {filler!r} feature themselves")
    squared = [float(v.square().sum()) for v in vectors]
    target = max(squared) + 1.0  # every row gets a filler of at least 1
    with torch.no_grad():
        for token, (vector, sq) in enumerate(zip(vectors, squared)):
            vector[features[filler]] = math.sqrt(target - sq)
            model.model.embed_tokens.weight[token].copy_(vector)
    return math.sqrt(target)


def set_lm_head(model: HybridLM, features: Features, rows: Mapping[int, Terms]) -> None:
    """Logit of token id t = <rows[t], final normed hidden state>; tokens not listed get logit 0."""
    with torch.no_grad():
        for token, terms in rows.items():
            model.lm_head.weight[token].copy_(features.vector(terms))


def _check_lags(lags: Mapping[int, float], width: int) -> None:
    bad = [lag for lag in lags if not 0 <= lag < width]
    if bad:
        raise ValueError(f"conv lags must lie in [0, {width - 1}] (kernel {width}); got {bad}")


class GDNHead:
    """Writes the weights of one head of a `GatedDeltaNet` layer (head h: q/k head h, value head h).

    Projections read the layer's normed input (the block's input RMSNorm of the residual). Channels are
    indices inside the head (key channel c < key_head_dim, value channel c < value_head_dim). For q, k and
    v a channel's short-conv weights are given as {lag: weight}, lag 0 being the current token (the
    conv's last tap); the default is the current token alone, so the conv then passes the projection
    straight to the SiLU.
    """

    def __init__(self, block: GatedDeltaNetBlock, head: int, features: Features):
        self.layer: GatedDeltaNet = block.linear_attn
        if self.layer.key_heads != self.layer.value_heads:
            raise ValueError("hand-set constructions use one value head per key head")
        if not 0 <= head < self.layer.value_heads:
            raise ValueError(f"head {head} out of range: the layer has {self.layer.value_heads} heads")
        self.head = head
        self.features = features

    @property
    def key_dim(self) -> int:
        return self.layer.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.layer.value_head_dim

    def _project(self, proj: torch.nn.Linear, conv, row: int, terms: Terms, lags: Mapping[int, float]) -> None:
        width = conv.weight.shape[-1]
        _check_lags(lags, width)
        with torch.no_grad():
            proj.weight[row].copy_(self.features.vector(terms))
            conv.weight[row].zero_()
            for lag, weight in lags.items():
                conv.weight[row, 0, width - 1 - lag] = weight

    def _key_row(self, channel: int) -> int:
        if not 0 <= channel < self.key_dim:
            raise ValueError(f"key channel {channel} out of range [0, {self.key_dim})")
        return self.head * self.key_dim + channel

    def _value_row(self, channel: int) -> int:
        if not 0 <= channel < self.value_dim:
            raise ValueError(f"value channel {channel} out of range [0, {self.value_dim})")
        return self.head * self.value_dim + channel

    def query(self, channel: int, terms: Terms, lags: Mapping[int, float] = {0: 1.0}) -> None:
        self._project(self.layer.q_proj, self.layer.q_conv1d, self._key_row(channel), terms, lags)

    def key(self, channel: int, terms: Terms, lags: Mapping[int, float] = {0: 1.0}) -> None:
        self._project(self.layer.k_proj, self.layer.k_conv1d, self._key_row(channel), terms, lags)

    def value(self, channel: int, terms: Terms, lags: Mapping[int, float] = {0: 1.0}) -> None:
        self._project(self.layer.v_proj, self.layer.v_conv1d, self._value_row(channel), terms, lags)

    def beta(self, terms: Terms) -> None:
        """b = <terms, input>; beta = 2 sigmoid(b): exactly 1 where b = 0, exactly 2 where b >= 37."""
        with torch.no_grad():
            self.layer.b_proj.weight[self.head].copy_(self.features.vector(terms))

    def reset_where(self, terms: Terms) -> None:
        """Decay: alpha = 0 where a = <terms, input> >= 745 and alpha = 1 where a <= -745."""
        with torch.no_grad():
            self.layer.a_proj.weight[self.head].copy_(self.features.vector(terms))
            self.layer.A_log[self.head] = 0.0
            self.layer.dt_bias[self.head] = 0.0

    def gate(self, terms: Terms) -> None:
        """The output gate of every value channel of this head: silu(<terms, input>)."""
        with torch.no_grad():
            for channel in range(self.value_dim):
                self.layer.g_proj.weight[self._value_row(channel)].copy_(self.features.vector(terms))

    def output(self, channel: int, terms: Terms) -> None:
        """Residual += sum over features f of terms[f] * (gated-normed output of this value channel)."""
        with torch.no_grad():
            self.layer.o_proj.weight[:, self._value_row(channel)].copy_(self.features.vector(terms))


class AttentionHead:
    """Writes the weights of one head of an `Attention` layer (MHA, qk_norm='full')."""

    def __init__(self, block: AttentionBlock, head: int, features: Features):
        self.layer: Attention = block.self_attn
        if self.layer.n_kv_heads != self.layer.n_heads or self.layer.qk_norm != "full":
            raise ValueError("hand-set attention heads expect MHA with qk_norm='full'")
        self.head = head
        self.features = features

    def _row(self, channel: int) -> int:
        if not 0 <= channel < self.layer.head_dim:
            raise ValueError(f"head channel {channel} out of range [0, {self.layer.head_dim})")
        return self.head * self.layer.head_dim + channel

    def query(self, channel: int, terms: Terms) -> None:
        with torch.no_grad():
            self.layer.q_proj.weight[self._row(channel)].copy_(self.features.vector(terms))

    def key(self, channel: int, terms: Terms) -> None:
        with torch.no_grad():
            self.layer.k_proj.weight[self._row(channel)].copy_(self.features.vector(terms))

    def value(self, channel: int, terms: Terms) -> None:
        with torch.no_grad():
            self.layer.v_proj.weight[self._row(channel)].copy_(self.features.vector(terms))

    def output(self, channel: int, terms: Terms) -> None:
        with torch.no_grad():
            self.layer.o_proj.weight[:, self._row(channel)].copy_(self.features.vector(terms))

    def qk_norm_weights(self, query: float, key: float) -> None:
        """The QK-norm weights of this head's channels: they set the attention logits' scale."""
        with torch.no_grad():
            rows = slice(self.head * self.layer.head_dim, (self.head + 1) * self.layer.head_dim)
            self.layer.q_norm.weight[rows] = query
            self.layer.k_norm.weight[rows] = key


def gated_output_magnitude(head_output_norm: float, value_dim: int, gate: float, eps: float) -> float:
    """Norm-independent size of a GDN head's output after the gated RMSNorm (weight 1).

    A head output o with Euclidean norm `head_output_norm` becomes o * rms_scale * silu(gate): a vector
    pointing like o whose entries are o's entries / head_output_norm times the returned magnitude.
    """
    return head_output_norm * rms_scale(head_output_norm, value_dim, eps) * silu(gate)


def finalize(model: HybridLM, dtype: torch.dtype) -> HybridLM:
    """Cast to the run dtype and switch to inference mode."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"constructions run in float32 or float64; got {dtype}")
    return model.to(dtype).eval().requires_grad_(False)
