import json
import random

import numpy as np
import pytest

from hybridlm.data.tokenizer import Tokenizer, byte_to_unicode, train_bpe_tokenizer

TEXTS = [
    "hello world",
    "def f(x):\n    return x + 1\n",
    "über naïve café — 日本語のテキスト 🙂🚀 e\u0301",  # accents, CJK, emoji, a combining mark
    "bytes never seen in training: ∀x∈ℝ ₿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \t\r\n\x00\x7f",
    "  leading and trailing spaces  ",
    "",
]


def test_round_trip_and_exact_byte_lengths(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer)
    assert tokenizer.is_byte_level
    lengths = tokenizer.token_byte_lengths
    assert lengths.shape == (tokenizer.vocab_size,) and lengths.dtype == np.int64
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(text) for text in TEXTS]


def test_special_tokens_and_eos(tiny_tokenizer):
    tokenizer = Tokenizer(tiny_tokenizer)
    assert tokenizer.eos_token_id == 0 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == 1
    assert tokenizer.token_byte_lengths[0] == 0 and tokenizer.token_byte_lengths[1] == 0  # EOS and pad: no text
    # Every byte has its own token, so the vocabulary covers any input.
    assert sorted(tokenizer.token_byte_lengths[2:258].tolist()) == [1] * 256
    # Text that spells a special token stays text.
    ids = tokenizer.encode("a<|endoftext|>b")
    assert 0 not in ids and tokenizer.decode(ids) == "a<|endoftext|>b"
    assert Tokenizer(tiny_tokenizer, eos_token="<|pad|>").eos_token_id == 1
    assert Tokenizer(tiny_tokenizer, eos_token=1).eos_token_id == 1
    assert Tokenizer(tiny_tokenizer.parent).path == tiny_tokenizer  # a folder holding tokenizer.json
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(tiny_tokenizer, eos_token="<nope>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(tiny_tokenizer, eos_token=10**6)
    with pytest.raises(FileNotFoundError, match="hybridlm tokenizer train"):
        Tokenizer(tiny_tokenizer.parent / "missing.json")


def test_training_is_deterministic(tmp_path, word_salad):
    rng = random.Random(5)
    texts = [word_salad(rng, 50) for _ in range(100)]
    first = train_bpe_tokenizer(texts, 300, tmp_path / "a.json")
    second = train_bpe_tokenizer(iter(texts), 300, tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(ValueError, match=">= 258"):
        train_bpe_tokenizer(texts, 100, tmp_path / "c.json")


def test_byte_to_unicode_is_a_bijection_onto_printable_characters():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def _word_level_tokenizer(path, vocab: dict, specials: dict, pre_tokenizer: dict | None = None):
    """A minimal non-byte-level tokenizer.json written by hand."""
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special} for c, (i, special) in specials.items()],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer or {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    path.write_text(json.dumps(spec))
    return path


def test_missing_eos_and_approximate_byte_lengths(tmp_path):
    vocab = {"[UNK]": 0, "▁hello": 1, "<0x41>": 2, "##ing": 3, "wörld": 4, "</s>": 5, "<keep>": 6}
    path = _word_level_tokenizer(tmp_path / "word.json", vocab, {"</s>": (5, True), "<keep>": (6, False)})
    tokenizer = Tokenizer(path)
    assert tokenizer.eos_token_id == 5 and not tokenizer.is_byte_level and tokenizer.pad_token_id is None
    assert tokenizer.token_byte_lengths.tolist() == [5, 6, 1, 3, 6, 0, 6]  # "[UNK]" counts as its spelling

    no_eos = _word_level_tokenizer(tmp_path / "no_eos.json", {"[UNK]": 0, "a": 1}, {})
    with pytest.raises(ValueError, match="--eos-token"):
        Tokenizer(no_eos)


# The split pattern of cl100k-style tokenizers such as dolma2 (Olmo Hybrid's tokenizer).
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def test_dolma2_shaped_tokenizer(tiny_tokenizer, tmp_path):
    """Byte-level BPE behind a regex split, specials at ids 100257 / 100277 and unused ids below them."""
    spec = json.loads(tiny_tokenizer.read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    vocab = {token: i - 2 for token, i in spec["model"]["vocab"].items() if i >= 2}
    vocab.update({"<|endoftext|>": 100257, "<|pad|>": 100277})
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [dict(spec["added_tokens"][0], id=100257), dict(spec["added_tokens"][1], id=100277)]
    path = tmp_path / "dolma2_like.json"
    path.write_text(json.dumps(spec))

    tokenizer = Tokenizer(path)
    assert tokenizer.eos_token_id == 100257 and tokenizer.vocab_size == 100278 and tokenizer.is_byte_level
    assert tokenizer.pad_token_id == 100277
    lengths = tokenizer.token_byte_lengths
    assert lengths[100257] == lengths[100277] == lengths[len(vocab) + 100] == 0
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text and int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert 100257 not in tokenizer.encode("x<|endoftext|>y")
