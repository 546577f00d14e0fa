"""`HybridConfig`: one configuration for the whole model family.

A model is a stack of layers, each of one kind:

- ``"gdn"``: a Gated DeltaNet block (pre-norm, as Olmo Hybrid's GDN layers);
- ``"attn"``: a full causal attention block (post-norm, Olmo 2/3 "reordered norm");
- ``"swa"``: a sliding-window attention block (post-norm, window `sliding_window`).

The layout is either an explicit list (`layer_kinds`) or a pattern repeated over the layers
(`layer_pattern`, letters G = gdn, A = attn, S = swa; "GGGA" is Olmo Hybrid, "SSSA" Olmo 3).
With that one class, `HybridLM` expresses Olmo Hybrid, the Olmo 3 transformer, pure GDN, 1:1 and
7:1 hybrids, GDN without negative eigenvalues and DeltaNet without the decay gate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

LAYER_KINDS = ("gdn", "attn", "swa")
PATTERN_LETTERS = {"G": "gdn", "A": "attn", "S": "swa"}
QK_NORM_MODES = ("full", "head", "none")


@dataclass
class HybridConfig:
    """Architecture of a hybrid GDN / attention language model.

    Sizes follow the Hugging Face Olmo Hybrid config; defaults (`None`) are resolved in
    `__post_init__` exactly as `OlmoHybridConfig` resolves them.
    """

    vocab_size: int = 100352
    d_model: int = 3840
    n_layers: int = 32
    n_heads: int = 30
    n_kv_heads: int | None = None  # None: = n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_hidden: int = 11008
    layer_pattern: str = "GGGA"
    layer_kinds: list[str] | None = None  # explicit layout; overrides layer_pattern
    force_last_attention: bool = False  # with layer_pattern: make the last layer full attention (ladder hybrids)

    # Attention
    rope_theta: float | None = None  # None: no positional encoding (NoPE)
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "yarn", "factor": 8.0, ...}
    sliding_window: int = 4096  # for "swa" layers: a query sees itself and the window-1 keys before it
    qk_norm: str = "full"  # "full": RMSNorm over the whole q/k projection (Olmo); "head": per head
    max_seq_len: int = 65536

    # Gated DeltaNet
    gdn_key_heads: int | None = None  # None: = n_heads
    gdn_value_heads: int | None = None  # None: = n_heads
    gdn_key_head_dim: int | None = None  # None: int(0.75 * d_model / gdn_key_heads)
    gdn_value_head_dim: int | None = None  # None: 2 * gdn_key_head_dim
    gdn_conv_size: int = 4
    gdn_neg_eigval: bool = True  # beta in (0, 2) instead of (0, 1)
    gdn_use_decay: bool = True  # False: DeltaNet (no decay gate: no a_proj, A_log, dt_bias)
    gdn_use_output_gate: bool = True  # False: plain RMSNorm on the output, no g_proj
    gdn_norm_eps: float = 1e-5

    # Norms, embeddings, tokens
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | None = 100257

    # Initialisation (of a new model; loading a checkpoint overwrites all of it)
    init_std: float = 0.02
    gdn_a_log_range: tuple[float, float] = (0.0, 16.0)  # A ~ U(range), A_log = log A
    gdn_dt_range: tuple[float, float] = (1e-3, 0.1)  # dt log-uniform in range
    gdn_dt_init_floor: float = 1e-4

    # Resolved in __post_init__
    _resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layer_kinds is None:
            self.layer_kinds = layer_kinds_from_pattern(self.layer_pattern, self.n_layers)
            if self.force_last_attention and self.layer_kinds:
                self.layer_kinds[-1] = "attn"
        else:
            self.layer_kinds = list(self.layer_kinds)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.d_model // self.n_heads
        if self.gdn_key_heads is None:
            self.gdn_key_heads = self.n_heads
        if self.gdn_value_heads is None:
            self.gdn_value_heads = self.n_heads
        if self.gdn_key_head_dim is None and self.gdn_key_heads:
            self.gdn_key_head_dim = int(0.75 * self.d_model / self.gdn_key_heads)
        if self.gdn_value_head_dim is None and self.gdn_key_head_dim:
            self.gdn_value_head_dim = 2 * self.gdn_key_head_dim
        self.gdn_a_log_range = tuple(self.gdn_a_log_range)
        self.gdn_dt_range = tuple(self.gdn_dt_range)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming every field that is out of range."""
        problems = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer (got {value!r})")
        need(
            len(self.layer_kinds) == self.n_layers,
            f"layer_kinds has {len(self.layer_kinds)} entries but n_layers is {self.n_layers}",
        )
        bad_kinds = sorted({k for k in self.layer_kinds if k not in LAYER_KINDS})
        need(not bad_kinds, f"unknown layer kinds {bad_kinds}; valid kinds are {list(LAYER_KINDS)}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(
                value is None or (isinstance(value, int) and 0 <= value < self.vocab_size),
                f"{name} must be None or a token id in [0, vocab_size={self.vocab_size}) (got {value!r})",
            )
        need(self.qk_norm in QK_NORM_MODES, f"qk_norm must be one of {QK_NORM_MODES} (got {self.qk_norm!r})")
        if self.has_attention:
            need(
                self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
            )
            need(self.head_dim is not None and self.head_dim > 0, f"head_dim must be positive (got {self.head_dim})")
            if self.rope_theta is not None:
                need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim (got {self.head_dim})")
                need(self.rope_theta > 0, f"rope_theta must be positive or None for NoPE (got {self.rope_theta})")
            if "swa" in self.layer_kinds:
                need(self.sliding_window > 0, f"sliding_window must be positive (got {self.sliding_window})")
        if self.has_gdn:
            need(
                self.gdn_key_heads > 0 and self.gdn_value_heads % self.gdn_key_heads == 0,
                f"gdn_value_heads ({self.gdn_value_heads}) must be a multiple of gdn_key_heads ({self.gdn_key_heads})",
            )
            need(self.gdn_key_head_dim > 0, f"gdn_key_head_dim must be positive (got {self.gdn_key_head_dim})")
            need(self.gdn_value_head_dim > 0, f"gdn_value_head_dim must be positive (got {self.gdn_value_head_dim})")
            need(self.gdn_conv_size >= 1, f"gdn_conv_size must be >= 1 (got {self.gdn_conv_size})")
        if problems:
            raise ValueError("invalid HybridConfig:\n  - " + "\n  - ".join(problems))

    # Derived quantities ---------------------------------------------------------------------
    @property
    def has_gdn(self) -> bool:
        return "gdn" in self.layer_kinds

    @property
    def has_attention(self) -> bool:
        return any(kind in ("attn", "swa") for kind in self.layer_kinds)

    @property
    def gdn_key_dim(self) -> int:
        return self.gdn_key_heads * self.gdn_key_head_dim

    @property
    def gdn_value_dim(self) -> int:
        return self.gdn_value_heads * self.gdn_value_head_dim

    @property
    def layout(self) -> str:
        """The layer layout as a string of pattern letters, e.g. 'GGGAGGGA'."""
        letters = {kind: letter for letter, kind in PATTERN_LETTERS.items()}
        return "".join(letters[kind] for kind in self.layer_kinds)

    # Serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.pop("layer_pattern")  # layer_kinds is the resolved, explicit layout
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HybridConfig":
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "HybridConfig":
        """A copy with some fields changed; a new layer_pattern or n_layers re-derives the layout."""
        values = self.to_dict()
        if "layer_pattern" in changes or ("n_layers" in changes and "layer_kinds" not in changes):
            values.pop("layer_kinds")
            values["layer_pattern"] = changes.pop("layer_pattern", self.layout_pattern_guess())
        values.update(changes)
        return HybridConfig.from_dict(values)

    def layout_pattern_guess(self) -> str:
        """The shortest pattern that repeats to the current layout (the layout itself if none)."""
        layout = self.layout
        for length in range(1, len(layout) + 1):
            if len(layout) % length == 0 and layout[:length] * (len(layout) // length) == layout:
                return layout[:length]
        return layout


def layer_kinds_from_pattern(pattern: str, n_layers: int) -> list[str]:
    """Repeat `pattern` (letters G/A/S, or the word 'middle' for attention in the middle) over n_layers.

    'middle' places n_layers // 4 + 1 attention layers contiguously in the centre of the stack, the
    rest GDN (the ladder's `hybrid-gdn-middle`; this count reproduces its parameter table).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"layer_pattern must be a non-empty string of letters G/A/S (got {pattern!r})")
    if pattern == "middle":
        n_attn = min(n_layers, n_layers // 4 + 1)
        start = (n_layers - n_attn) // 2
        return ["attn" if start <= i < start + n_attn else "gdn" for i in range(n_layers)]
    bad = sorted(set(pattern.upper()) - set(PATTERN_LETTERS))
    if bad:
        raise ValueError(
            f"layer_pattern {pattern!r} has unknown letters {bad}; use G (gdn), A (attention), S (sliding window)"
        )
    letters = (pattern.upper() * math.ceil(n_layers / len(pattern)))[:n_layers]
    return [PATTERN_LETTERS[letter] for letter in letters]
