"""Named model configurations.

- `olmo-hybrid-7b`: the released Olmo Hybrid 7B (24 GDN + 8 attention layers, NoPE): 7,430,870,688 parameters.
- `olmo3-7b`: the Olmo 3 7B transformer baseline (3 sliding-window : 1 full attention): 7,298,617,344.
- `{family}-{size}`: the scaling-ladder shapes (sizes 60m ... 1b, dolma2 vocabulary 100,352) for every
  architecture family below, plus `mini` and `tiny` sizes (8,192-token vocabulary) for CPU runs and tests.
"""

from __future__ import annotations

import math
from typing import Any

from hybridlm.models.config import HybridConfig

# size: (d_model, n_heads, n_layers, mlp_hidden); the ladder's transformer base shapes.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 4, 4, 192),
    "mini": (256, 4, 8, 768),
    "60m": (384, 8, 8, 1536),
    "100m": (512, 8, 12, 2048),
    "190m": (768, 12, 12, 3072),
    "370m": (1024, 16, 16, 4096),
    "600m": (1280, 16, 16, 5120),
    "760m": (1536, 16, 16, 6144),
    "1b": (2048, 16, 16, 8192),
}
SMALL_SIZES = ("tiny", "mini")

# family: (description, config fields). Attention layers use RoPE theta 500,000 as in ladder pretraining.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "olmo3": ("Olmo 3 transformer: 3 sliding-window (4096) : 1 full attention", {"layer_pattern": "SSSA"}),
    "transformer": ("transformer with full attention in every layer", {"layer_pattern": "A"}),
    "hybrid": ("Olmo Hybrid: 3 GDN : 1 attention, negative eigenvalues", {"layer_pattern": "GGGA"}),
    "hybrid-1to1": ("1 GDN : 1 attention", {"layer_pattern": "GA"}),
    "hybrid-7to1": ("7 GDN : 1 attention", {"layer_pattern": "GGGGGGGA"}),
    "hybrid-middle": ("GDN with n/4+1 contiguous attention layers in the middle", {"layer_pattern": "middle"}),
    "hybrid-noneg": ("3 GDN : 1 attention, GDN with beta in (0, 1)", {"layer_pattern": "GGGA", "gdn_neg_eigval": False}),
    "pure-gdn": ("GDN only, negative eigenvalues", {"layer_pattern": "G"}),
    "pure-gdn-noneg": ("GDN only, beta in (0, 1)", {"layer_pattern": "G", "gdn_neg_eigval": False}),
    "deltanet": ("DeltaNet (no decay gate) only, negative eigenvalues", {"layer_pattern": "G", "gdn_use_decay": False}),
    "deltanet-noneg": (
        "DeltaNet (no decay gate) only, beta in (0, 1)",
        {"layer_pattern": "G", "gdn_use_decay": False, "gdn_neg_eigval": False},
    ),
}

DOLMA2_VOCAB = {"vocab_size": 100352, "eos_token_id": 100257, "pad_token_id": 100277, "bos_token_id": None}
SMALL_VOCAB = {"vocab_size": 8192, "eos_token_id": 0, "pad_token_id": 1, "bos_token_id": None}


def olmo_hybrid_7b() -> HybridConfig:
    return HybridConfig(
        **DOLMA2_VOCAB,
        d_model=3840,
        n_layers=32,
        n_heads=30,
        mlp_hidden=11008,
        layer_pattern="GGGA",
        rope_theta=None,
        gdn_key_head_dim=96,
        gdn_value_head_dim=192,
        max_seq_len=65536,
    )


def olmo3_7b() -> HybridConfig:
    return HybridConfig(
        **DOLMA2_VOCAB,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        mlp_hidden=11008,
        layer_pattern="SSSA",
        sliding_window=4096,
        rope_theta=500000.0,
        max_seq_len=65536,
    )


def ladder_config(family: str, size: str) -> HybridConfig:
    if family not in FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; valid families: {sorted(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {list(SIZES)}")
    d_model, n_heads, n_layers, mlp_hidden = SIZES[size]
    if size in SMALL_SIZES:
        # 0.75 d / h rounded up to a multiple of 16 (small models keep small heads).
        key_head_dim = 16 * math.ceil(0.75 * d_model / n_heads / 16)
        vocab = SMALL_VOCAB
        max_seq_len = 8192
    else:
        # The ladder rounds 0.75 d / h up to a multiple of 128, which is 128 at every size.
        key_head_dim = 128 * math.ceil(0.75 * d_model / n_heads / 128)
        vocab = DOLMA2_VOCAB
        max_seq_len = 8192
    fields = dict(
        **vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        mlp_hidden=mlp_hidden,
        rope_theta=500000.0,
        sliding_window=4096,
        gdn_key_head_dim=key_head_dim,
        gdn_value_head_dim=2 * key_head_dim,
        max_seq_len=max_seq_len,
    )
    fields.update(FAMILIES[family][1])
    if "G" in fields["layer_pattern"] and "A" in fields["layer_pattern"]:
        fields["force_last_attention"] = True  # the ladder forces the last layer of a hybrid to attention
    return HybridConfig(**fields)


def preset_names() -> list[str]:
    names = ["olmo-hybrid-7b", "olmo3-7b"]
    names += [f"{family}-{size}" for family in FAMILIES for size in SIZES]
    return names


def get_preset(name: str, **overrides: Any) -> HybridConfig:
    """The named configuration, with optional field overrides (e.g. vocab_size=8192)."""
    key = name.lower()
    if key == "olmo-hybrid-7b":
        config = olmo_hybrid_7b()
    elif key == "olmo3-7b":
        config = olmo3_7b()
    else:
        family, _, size = key.rpartition("-")
        if family not in FAMILIES or size not in SIZES:
            raise ValueError(
                f"unknown preset {name!r}. Valid presets: olmo-hybrid-7b, olmo3-7b, or FAMILY-SIZE with FAMILY in "
                f"{sorted(FAMILIES)} and SIZE in {list(SIZES)} (e.g. hybrid-60m)"
            )
        config = ladder_config(family, size)
    return config.replace(**overrides) if overrides else config
