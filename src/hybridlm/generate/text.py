"""Streaming detokenization: turn a growing list of token ids into text, printing only finished text.

A byte-level tokenizer can split one multi-byte UTF-8 character over several tokens; decoding a
prefix then ends in U+FFFD (the replacement character). We decode a small window of recent tokens
and release text only once it no longer ends in an incomplete character. Decoding the window
together with a few earlier tokens (the prefix) keeps spacing rules that depend on the previous
token (e.g. SentencePiece's leading-space marker) intact.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one step at a time; each call returns the newly completed text ("" if none).

    decode: a function from a list of token ids to text (e.g. `tokenizers.Tokenizer.decode`).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self._prefix_start = 0  # window start: tokens before it are already printed and settled
        self._read_start = 0  # tokens before it are already printed

    def push(self, token_ids: list[int] | int) -> str:
        """Add tokens; return the text they complete."""
        self.tokens.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self.tokens[self._prefix_start : self._read_start])
        full_text = self._decode(self.tokens[self._prefix_start :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHARACTER):
            return ""  # nothing new, or the last character is still incomplete
        self._prefix_start = self._read_start
        self._read_start = len(self.tokens)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The remaining text at the end of generation, incomplete characters included."""
        prefix_text = self._decode(self.tokens[self._prefix_start : self._read_start])
        full_text = self._decode(self.tokens[self._prefix_start :])
        self._prefix_start = self._read_start = len(self.tokens)
        return full_text[len(prefix_text) :]
