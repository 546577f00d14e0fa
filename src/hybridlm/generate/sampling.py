"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Everything stays on the logits' device and nothing reads a value back to the host, so a decode
loop never waits for the GPU here. Sampling uses the exponential-race form of a categorical draw
(argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability p_i), which needs one random
tensor from a seeded `torch.Generator` and no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (None or 0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy); got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 keeps every token); got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token); got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next_token(
    logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits: [B, vocab] (any float dtype) -> next token ids [B] int64, on the logits' device."""
    if config.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / config.temperature
    vocab = scores.shape[-1]
    if config.top_k and config.top_k < vocab:
        kth_best = torch.topk(scores, config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best one always stays).
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
