"""Fixtures for the generation tests: tiny models of every layer kind, a byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from hybridlm.models import HybridConfig, HybridLM

VOCAB = 97


def tiny_config(layer_pattern: str = "GGAS", **overrides) -> HybridConfig:
    fields = dict(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        layer_pattern=layer_pattern,
        rope_theta=10000.0,
        sliding_window=5,  # shorter than the prompts, so ring buffers wrap
        gdn_key_heads=2,
        gdn_value_heads=4,
        gdn_key_head_dim=8,
        gdn_value_head_dim=12,
        pad_token_id=0,
        eos_token_id=1,
        max_seq_len=128,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


CONFIGS = {
    "hybrid-rope": tiny_config(),
    "hybrid-nope": tiny_config(rope_theta=None),
    "olmo3-like": tiny_config("SSSA"),
    "pure-gdn": tiny_config("G"),
    "deltanet-nogate": tiny_config("GA", gdn_use_decay=False, gdn_use_output_gate=False, qk_norm="head"),
}


def tiny_model(name: str = "hybrid-rope", seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(CONFIGS[name]).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.1 * torch.randn_like(param))
            elif param_name.endswith("weight") and "embed" not in param_name:
                param.mul_(3.0)  # sharper logits: greedy choices are not near-ties
    return model


def byte_level_tokenizer():
    """A byte-level BPE with no merges (every UTF-8 byte is one token, ids 0-255, so characters of
    several bytes are split over tokens) and the special token <|endoftext|> (id 256)."""
    import tokenizers

    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture
def make_model():
    """make_model(name="hybrid-rope", seed=0) -> a tiny HybridLM in eval mode (names: CONFIGS)."""
    return tiny_model


@pytest.fixture
def make_config():
    """make_config(layer_pattern="GGAS", **overrides) -> a tiny HybridConfig."""
    return tiny_config


@pytest.fixture
def byte_tokenizer():
    return byte_level_tokenizer()
