"""Streaming detokenization never prints half a UTF-8 character and reproduces the whole text."""

from __future__ import annotations

from hybridlm.generate import IncrementalDetokenizer

TEXT = "naïve café — 日本語 ok 🙂🙂 fin"


def _byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_byte_tokens_stream_whole_characters_only():
    detokenizer = IncrementalDetokenizer(_byte_decode)
    pieces = [detokenizer.push(byte) for byte in TEXT.encode("utf-8")]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") > 5  # multi-byte characters were held back until complete


def test_hugging_face_byte_level_tokenizer_round_trips(byte_tokenizer):
    tokenizer = byte_tokenizer
    ids = tokenizer.encode(TEXT).ids
    assert len(ids) == len(TEXT.encode("utf-8"))  # one token per byte: characters are split
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    streamed = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
    assert streamed == TEXT == tokenizer.decode(ids)


def test_incomplete_character_at_the_end_is_flushed():
    detokenizer = IncrementalDetokenizer(_byte_decode)
    data = "ab".encode() + "日".encode()[:2]
    streamed = "".join(detokenizer.push(b) for b in data)
    assert streamed == "ab"
    assert detokenizer.flush() == "\ufffd"

