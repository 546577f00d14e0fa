"""Fixtures for the evaluation tests: a small prepared dataset and tiny random models saved in the
Hugging Face format beside the dataset's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hybridlm.models import HybridConfig, HybridLM


@pytest.fixture(scope="session")
def eval_dataset(tmp_path_factory) -> Path:
    """16 stdlib files with a 384-token byte-level BPE."""
    from hybridlm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("eval-data"), max_files=16, vocab_size=384, progress=False)


@pytest.fixture(scope="session")
def eval_tokenizer(eval_dataset):
    from hybridlm.data import TokenDataset

    return TokenDataset(eval_dataset).tokenizer


def tiny_eval_config(tokenizer, **overrides) -> HybridConfig:
    fields = dict(
        vocab_size=384,
        d_model=32,
        n_layers=4,
        n_heads=2,
        head_dim=16,
        mlp_hidden=64,
        layer_pattern="GGGA",
        rope_theta=10000.0,
        gdn_key_heads=2,
        gdn_value_heads=2,
        gdn_key_head_dim=8,
        gdn_value_head_dim=16,
        max_seq_len=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


@pytest.fixture(scope="session")
def make_eval_model(eval_tokenizer):
    """make_eval_model(seed=0, **config overrides) -> a tiny random HybridLM (eval mode, float32)."""

    def make(seed: int = 0, **overrides) -> HybridLM:
        torch.manual_seed(seed)
        return HybridLM(tiny_eval_config(eval_tokenizer, **overrides)).eval()

    return make


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, make_eval_model, eval_tokenizer) -> Path:
    """A tiny random model saved in the Hugging Face format with the dataset's tokenizer.json beside it."""
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-hybrid"
    make_eval_model(seed=1).save_pretrained(path)
    shutil.copyfile(eval_tokenizer.path, path / "tokenizer.json")
    return path
