"""Logits equal transformers' Olmo Hybrid / Olmo 3 on random checkpoints, in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.interop.hf import CheckpointError
from hybridlm.models import HybridLM

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def _tiny_hybrid_kwargs(**overrides):
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        linear_num_key_heads=4,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": None},
    )
    kwargs.update(overrides)
    return kwargs


HYBRID_CASES = {
    "nope-negeig": {},
    "rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "gqa-rope": {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "grouped-values": {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_value_head_dim": 12},
    "no-negeig": {"linear_allow_neg_eigval": False},
    "unusual-layout": {
        "num_hidden_layers": 5,
        "layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
    },
    "wide-heads": {"hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 3, "linear_num_key_heads": 3, "linear_num_value_heads": 6,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 32},
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norm weights, A_log, dt_bias included) a random, non-default value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=generator) * 2.0 - 1.0)
            elif name.endswith("dt_bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.08 * noise)


def _hf_hybrid(case: str, seed: int = 0):
    config = transformers.OlmoHybridConfig(**_tiny_hybrid_kwargs(**HYBRID_CASES[case]))
    model = transformers.OlmoHybridForCausalLM(config).eval()
    _randomise(model, seed)
    return model


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", sorted(HYBRID_CASES))
def test_hybrid_logits_match_transformers_both_ways(case, tmp_path):
    hf_model = _hf_hybrid(case)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = HybridLM.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.randint(3, 99, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        got = ours(input_ids).logits
    assert _max_relative(got, expected) <= TOLERANCE

    # ours -> HF: transformers loads what we write and computes the same logits.
    ours.save_pretrained(tmp_path / "ours")
    reloaded_hf = transformers.OlmoHybridForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert _max_relative(reloaded_hf(input_ids).logits, expected) <= TOLERANCE

    # ours -> HF format -> ours is exact.
    again = HybridLM.from_pretrained(tmp_path / "ours")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_fused_conv_and_old_norm_names_load_identically(tmp_path):
    hf_model = _hf_hybrid("grouped-values", seed=3)
    hf_model.save_pretrained(tmp_path / "separate")
    tensors = load_file(str(tmp_path / "separate" / "model.safetensors"))
    assert any(name.endswith("q_conv1d.weight") for name in tensors)  # the released layout
    fused = {}
    for name, tensor in tensors.items():
        if name.endswith("linear_attn.q_conv1d.weight"):
            prefix = name[: -len("q_conv1d.weight")]
            fused[prefix + "conv1d.weight"] = torch.cat(
                [tensor, tensors[prefix + "k_conv1d.weight"], tensors[prefix + "v_conv1d.weight"]]
            )
        elif name.endswith(("k_conv1d.weight", "v_conv1d.weight")):
            continue
        else:
            fused[name.replace(".input_layernorm.", ".attention_layer_norm.")] = tensor
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "separate" / "config.json").read_text())

    a = HybridLM.from_pretrained(tmp_path / "separate")
    b = HybridLM.from_pretrained(tmp_path / "fused")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_sharded_checkpoint_round_trip(tmp_path):
    hf_model = _hf_hybrid("rope", seed=5)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = HybridLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = HybridLM.from_pretrained(tmp_path / "sharded")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    reloaded_hf = transformers.OlmoHybridForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    input_ids = torch.randint(3, 99, (1, 40))
    with torch.no_grad():
        assert _max_relative(reloaded_hf(input_ids).logits, hf_model.eval()(input_ids).logits) <= TOLERANCE


def test_olmo3_logits_match_transformers(tmp_path):
    config = transformers.Olmo3Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=7,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-6,
    )
    hf_model = transformers.Olmo3ForCausalLM(config).eval()
    _randomise(hf_model, 11)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = HybridLM.from_pretrained(tmp_path / "hf").eval()
    assert ours.config.layout == "SSSA" and ours.config.sliding_window == 7
    input_ids = torch.randint(2, 101, (2, 30))
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        assert _max_relative(ours(input_ids).logits, expected) <= TOLERANCE
    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.Olmo3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert _max_relative(reloaded(input_ids).logits, expected) <= TOLERANCE


def _write_checkpoint(path, config: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def test_bad_checkpoints_list_every_problem(tmp_path):
    hf_model = _hf_hybrid("nope-negeig")
    hf_model.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "good" / "model.safetensors"))

    broken = dict(tensors)
    del broken["model.layers.0.linear_attn.A_log"]
    broken["model.layers.0.linear_attn.out_proj.weight"] = torch.zeros(32, 32)
    broken["model.layers.3.self_attn.q_norm.weight"] = torch.ones(16)
    _write_checkpoint(tmp_path / "broken", config, broken)
    with pytest.raises(CheckpointError) as error:
        HybridLM.from_pretrained(tmp_path / "broken")
    message = str(error.value)
    assert "model.layers.0.linear_attn.A_log" in message
    assert "model.layers.0.linear_attn.out_proj.weight" in message
    assert "model.layers.3.self_attn.q_norm.weight" in message and "(16,)" in message

    _write_checkpoint(tmp_path / "unknown", {**config, "model_type": "llama"}, tensors)
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        HybridLM.from_pretrained(tmp_path / "unknown")

    missing_fields = {k: v for k, v in config.items() if k not in ("hidden_size", "num_hidden_layers")}
    _write_checkpoint(tmp_path / "fields", missing_fields, tensors)
    with pytest.raises(CheckpointError, match="missing required fields.*hidden_size.*num_hidden_layers"):
        HybridLM.from_pretrained(tmp_path / "fields")

    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no weights"):
        HybridLM.from_pretrained(tmp_path / "no-weights")
    with pytest.raises(CheckpointError, match="no config.json"):
        HybridLM.from_pretrained(tmp_path)


def test_missing_neg_eigval_field_defaults_to_true_like_transformers(tmp_path):
    hf_model = _hf_hybrid("nope-negeig")
    hf_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.pop("linear_allow_neg_eigval", None)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert HybridLM.from_pretrained(tmp_path / "ckpt").config.gdn_neg_eigval is True


def test_legacy_null_rope_theta_means_nope(tmp_path):
    hf_model = _hf_hybrid("rope")
    hf_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = None  # the released files' spelling
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    assert HybridLM.from_pretrained(tmp_path / "ckpt").config.rope_theta is None
