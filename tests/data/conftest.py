"""Shared fixtures: a tiny corpus written to a temporary directory and a tiny BPE tokenizer trained on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hybridlm.data.tokenizer import train_bpe_tokenizer

WORDS = ("the", "delta", "rule", "gated", "state", "attention", "hybrid", "model", "token", "layer", "über",
         "naïve", "日本語", "emoji🙂", "def", "return", "x", "+", "1", "\n", "    ", "#", "*")


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_corpus(root: Path, n_files: int = 24, n_jsonl: int = 30, seed: int = 0) -> Path:
    """A directory of .txt/.md/.py files (some nested) and one JSONL file, with random word salad."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffixes = (".txt", ".md", ".py")
    for i in range(n_files):
        folder = root / ("nested/deeper" if i % 5 == 0 else "nested" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc{i:03d}{suffixes[i % 3]}").write_text(random_text(rng, rng.randint(5, 80)), encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01 not a text suffix")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "skip.txt").write_text("hidden directories are skipped")
    with open(root / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_jsonl):
            f.write(json.dumps({"id": i, "text": random_text(rng, rng.randint(3, 40))}) + "\n")
            if i % 7 == 0:
                f.write("\n")  # blank lines are allowed and skipped
    return root


@pytest.fixture
def word_salad():
    """random_text(rng, n_words): random words, with non-ASCII, newlines and indentation."""
    return random_text


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of 320 tokens trained on random word salad (ids 0, 1 = <|endoftext|>, <|pad|>)."""
    rng = random.Random(1)
    texts = [random_text(rng, 60) for _ in range(200)]
    return train_bpe_tokenizer(texts, 320, tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")
