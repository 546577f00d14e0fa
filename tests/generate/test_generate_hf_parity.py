"""Greedy generation equals transformers' greedy `generate` on random Olmo Hybrid / Olmo 3 checkpoints."""

from __future__ import annotations

import pytest
import torch

from hybridlm.models import HybridLM

transformers = pytest.importorskip("transformers")

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
}
MAX_NEW_TOKENS = 16


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter (norm weights, A_log, dt_bias included) random, so logits are far from uniform."""
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
                param.copy_(0.15 * noise)


def _hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=hf_model.config.eos_token_id,
            pad_token_id=hf_model.config.pad_token_id,
        )[0, len(prompt) :].tolist()
    eos = hf_model.config.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


def _compare(hf_model, path, prompts: list[list[int]]) -> None:
    hf_model.save_pretrained(path)
    ours = HybridLM.from_pretrained(path).eval()
    expected = [_hf_greedy(hf_model, prompt) for prompt in prompts]
    assert any(len(tokens) > 4 for tokens in expected)  # the comparison covers decoding, not only eos
    assert ours.generate(prompts, max_new_tokens=MAX_NEW_TOKENS) == expected  # one left-padded batch
    for prompt, tokens in zip(prompts, expected):
        assert ours.generate([prompt], max_new_tokens=MAX_NEW_TOKENS) == [tokens]


@pytest.mark.parametrize("case", sorted(HYBRID_CASES))
def test_greedy_generation_matches_transformers_olmo_hybrid(case, tmp_path):
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
    kwargs.update(HYBRID_CASES[case])
    hf_model = transformers.OlmoHybridForCausalLM(transformers.OlmoHybridConfig(**kwargs)).eval()
    _randomise(hf_model, seed=sorted(HYBRID_CASES).index(case))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 99, (n,), generator=generator).tolist() for n in (11, 4, 7)]
    _compare(hf_model, tmp_path, prompts)


def test_greedy_generation_matches_transformers_olmo3_past_the_sliding_window(tmp_path):
    config = transformers.Olmo3Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,  # prompts + new tokens run well past it: our ring buffer wraps
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-6,
    )
    hf_model = transformers.Olmo3ForCausalLM(config).eval()
    _randomise(hf_model, seed=11)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 101, (n,), generator=generator).tolist() for n in (9, 3)]
    _compare(hf_model, tmp_path, prompts)
