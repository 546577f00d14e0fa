"""Config validation, layouts, and exact preset parameter counts."""

from __future__ import annotations

import pytest
import torch

from hybridlm.models import FAMILIES, SIZES, HybridConfig, HybridLM, get_preset, layer_kinds_from_pattern, preset_names


def _count(name: str, **kwargs) -> int:
    with torch.device("meta"):
        return HybridLM(get_preset(name)).num_parameters(**kwargs)


def test_seven_billion_presets_are_exact():
    assert _count("olmo-hybrid-7b") == 7_430_870_688
    assert _count("olmo3-7b") == 7_298_617_344


def test_olmo_hybrid_7b_layer_sizes():
    with torch.device("meta"):
        model = HybridLM(get_preset("olmo-hybrid-7b"))
    sizes = {kind: sum(p.numel() for p in block.parameters()) for kind, block in zip(model.config.layer_kinds, model.model.layers)}
    assert sizes == {"gdn": 215_570_172, "attn": 185_809_920}
    assert model.config.layout == "GGGA" * 8 and model.config.rope_theta is None


# Non-embedding parameters (LM head included) from the reference ladder table, in millions.
LADDER_TABLE = {
    "olmo3": (57.4, 101.7, 190.4, 371.3, 548.0, 758.2, 1280),
    "hybrid": (72.9, 130.3, 254.4, 523.0, 721.8, 947.9, 1480),
    "hybrid-1to1": (67.7, 120.8, 233.1, 472.4, 663.9, 884.7, 1410),
    "hybrid-7to1": (75.5, 133.4, 261.6, 548.3, 750.8, 979.5, 1520),
    "hybrid-middle": (70.3, 127.1, 247.3, 510.4, 707.4, 932.1, 1460),
    "pure-gdn": (78.1, 139.8, 275.8, 573.6, 779.8, 1010, 1550),
}


@pytest.mark.parametrize("family", sorted(LADDER_TABLE))
def test_ladder_parameter_counts_match_the_reference_table(family):
    sizes = ["60m", "100m", "190m", "370m", "600m", "760m", "1b"]
    for size, expected_millions in zip(sizes, LADDER_TABLE[family]):
        got = _count(f"{family}-{size}", exclude_embeddings=True) / 1e6
        # The table rounds to 0.1M (3 significant digits above 1B); two entries round 78.046 and 707.347 up.
        tolerance = 0.06 if expected_millions < 1000 else 5.0
        assert abs(got - expected_millions) <= tolerance, (family, size, got, expected_millions)


def test_every_preset_builds_on_meta():
    names = preset_names()
    assert len(names) == 2 + len(FAMILIES) * len(SIZES)
    for name in names:
        with torch.device("meta"):
            HybridLM(get_preset(name))


def test_layouts():
    assert layer_kinds_from_pattern("GGGA", 6) == ["gdn", "gdn", "gdn", "attn", "gdn", "gdn"]
    assert HybridConfig(n_layers=12, layer_pattern="GGGGGGGA", force_last_attention=True).layout == "GGGGGGGAGGGA"
    assert get_preset("hybrid-middle-60m").layout == "GGAAAGGG"
    assert get_preset("olmo3-60m").layout == "SSSASSSA"
    assert get_preset("pure-gdn-noneg-tiny").gdn_neg_eigval is False
    assert get_preset("deltanet-tiny").gdn_use_decay is False


def test_invalid_configs_name_every_problem():
    with pytest.raises(ValueError) as error:
        HybridConfig(n_layers=4, layer_kinds=["gdn", "mamba", "attn"], n_heads=6, n_kv_heads=4, d_model=48, qk_norm="x")
    message = str(error.value)
    assert "layer_kinds has 3 entries but n_layers is 4" in message
    assert "unknown layer kinds ['mamba']" in message
    assert "multiple of n_kv_heads" in message
    assert "qk_norm" in message
    with pytest.raises(ValueError, match="unknown letters"):
        HybridConfig(layer_pattern="GXA")
    with pytest.raises(ValueError, match="eos_token_id must be None or a token id"):
        HybridConfig(vocab_size=100)
    with pytest.raises(ValueError, match="unknown preset 'hybrid-3b'"):
        get_preset("hybrid-3b")
    with pytest.raises(ValueError, match="unknown HybridConfig fields"):
        HybridConfig.from_dict({"d_model": 64, "depth": 3})


def test_config_dict_round_trip_and_replace():
    config = get_preset("hybrid-60m")
    assert HybridConfig.from_dict(config.to_dict()) == config
    smaller = config.replace(vocab_size=8192, eos_token_id=0, pad_token_id=1)
    assert smaller.vocab_size == 8192 and smaller.layer_kinds == config.layer_kinds
    deeper = config.replace(n_layers=12)
    assert deeper.layout == "GGGAGGGAGGGA"
