"""Tokenizers: a thin wrapper over any Hugging Face `tokenizer.json`, and byte-level BPE training.

The wrapper adds what training and evaluation need on top of the `tokenizers` library:
the end-of-document id (EOS), and the number of UTF-8 bytes each token stands for, so that
a loss in nats per token can be turned into bits per byte exactly.

Text is always text: a document that happens to contain the string "<|endoftext|>" is
tokenized as ordinary characters, never as the EOS id. Special ids enter the stream only
where our code puts them (after each document).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

# Names under which tokenizers commonly store their end-of-text token, most common first.
EOS_TOKEN_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
PAD_TOKEN_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 and its descendants).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...)
    are moved, in byte order, to the characters U+0100, U+0101, ... so that every byte has
    a visible, non-whitespace character. A byte-level vocabulary entry is a string over
    these 256 characters, one character per byte.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_tokenizer_path(path: str | Path) -> Path:
    """Accept a `tokenizer.json` file or a directory holding one (a Hugging Face model folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected a Hugging Face tokenizer.json file (or a folder holding one); "
            "train one with `hybridlm tokenizer train FILES --vocab-size 8192 --out tokenizer.json`"
        )
    return path


def _contains_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_contains_byte_level(part) for part in component.get("decoders", component.get("pretokenizers", [])))


class Tokenizer:
    """A Hugging Face `tokenizer.json`, with an EOS id and per-token UTF-8 byte lengths.

    Args:
        path: a tokenizer.json file, or a directory holding one.
        eos_token: the end-of-document token, as its string (e.g. "<|endoftext|>") or its id.
            When None, the first of EOS_TOKEN_CANDIDATES present in the vocabulary is used.
    """

    def __init__(self, path: str | Path, eos_token: str | int | None = None):
        import tokenizers

        self.path = resolve_tokenizer_path(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
        # Special tokens are matched only where our code inserts them, never inside text.
        self._tokenizer.encode_special_tokens = True
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_token_id = self._find_eos(eos_token, vocab)
        self.eos_token = self._tokenizer.id_to_token(self.eos_token_id)
        # Padding id, when the vocabulary has one (None otherwise). Nothing in the data pipeline pads.
        self.pad_token_id: int | None = next((vocab[t] for t in PAD_TOKEN_CANDIDATES if t in vocab), None)

    def _find_eos(self, eos_token: str | int | None, vocab: dict[str, int]) -> int:
        if isinstance(eos_token, int) or (isinstance(eos_token, str) and eos_token.isdigit()):
            eos_id = int(eos_token)
            if not 0 <= eos_id < self.vocab_size or self._tokenizer.id_to_token(eos_id) is None:
                raise ValueError(f"EOS id {eos_id} is not in the vocabulary of {self.path} "
                                 f"(ids 0..{self.vocab_size - 1})")
            return eos_id
        if eos_token is not None:
            if eos_token not in vocab:
                raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary of {self.path}; "
                                 "pass a token it has")
            return vocab[eos_token]
        for candidate in EOS_TOKEN_CANDIDATES:
            if candidate in vocab:
                return vocab[candidate]
        raise ValueError(
            f"found no end-of-text token in {self.path}: looked for {', '.join(EOS_TOKEN_CANDIDATES)}; "
            "name it with --eos-token TOKEN (a token string or an integer id)"
        )

    @cached_property
    def sha256(self) -> str:
        """sha256 of the tokenizer.json bytes: the tokenizer's identity in dataset metadata."""
        return file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() for many texts at once (parallel inside `tokenizers` unless TOKENIZERS_PARALLELISM=false)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def is_byte_level(self) -> bool:
        """True when tokens are strings over the byte-level alphabet (then byte lengths are exact)."""
        import json

        spec = json.loads(self._tokenizer.to_str())
        return _contains_byte_level(spec.get("decoder"))

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        """int64 [vocab_size]: how many UTF-8 bytes of text each token id stands for.

        Special tokens (EOS, padding, ...) stand for no text: 0. Ids missing from the
        vocabulary: 0. For a byte-level tokenizer every ordinary token is a fixed byte string,
        so sum(token_byte_lengths[encode(text)]) == len(text.encode("utf-8")) exactly. For other
        tokenizers (SentencePiece / WordPiece style) it is an approximation: "▁" counts as one
        space, "<0xNN>" byte-fallback tokens as one byte, a leading "##" as nothing, and
        normalization the tokenizer applies to the text is not undone.
        """
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        added = self._tokenizer.get_added_tokens_decoder()
        byte_of_char = {c: b for b, c in byte_to_unicode().items()}
        byte_fallback = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id in added:
                lengths[token_id] = 0 if added[token_id].special else len(added[token_id].content.encode("utf-8"))
            elif self.is_byte_level and all(c in byte_of_char for c in token):
                lengths[token_id] = len(token)
            elif byte_fallback.fullmatch(token):
                lengths[token_id] = 1
            else:
                text = token[2:] if token.startswith("##") else token
                lengths[token_id] = len(text.replace("▁", " ").encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r}/{self.eos_token_id})")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out: str | Path,
    *,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and write it to `out` (a tokenizer.json).

    Ids 0 and 1 are the special tokens "<|endoftext|>" (EOS) and "<|pad|>"; ids 2..257 are the
    256 single bytes, so any text can be encoded; the rest are merges, learned in order of
    frequency. Deterministic: the same texts in the same order give the same file. `texts` is
    consumed once, as a stream. The file is written under a temporary name and then renamed,
    so `out` is either absent or complete.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 bytes + 2 special tokens "
                         "(>= 258)")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tokenizer.save(str(temporary))
    os.replace(temporary, out)
    return out
