"""Shared fixtures: a small slice of the embedded corpus, prepared once, and a tiny training config."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridlm.train import TrainConfig



@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """24 stdlib files with a 512-token BPE: ~120k training and ~2.7k held-out tokens."""
    from hybridlm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data"), max_files=24, vocab_size=512, progress=False)


TINY_OVERRIDES = (
    "model.preset=hybrid-tiny",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.steps=6",
    "schedule.warmup_steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_sequences=8",
    "trainer.checkpoint_every=3",
    "trainer.keep_last=0",
    "trainer.sample_tokens=0",
    "optimizer.lr=3e-3",
)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_dataset):
    """tiny_overrides(*extra) -> the --set list of a 6-step run of a 4-layer d=64 hybrid on the tiny dataset."""

    def make(*extra: str) -> list[str]:
        return [f"data.dataset={tiny_dataset}", *TINY_OVERRIDES, *extra]

    return make


@pytest.fixture(scope="session")
def tiny_config(tiny_overrides):
    """tiny_config(*extra) -> the validated TrainConfig of tiny_overrides(*extra)."""

    def make(*extra: str) -> TrainConfig:
        return TrainConfig.from_yaml(None, tiny_overrides(*extra))

    return make
