"""Sampling draws from the right distribution; top-k / top-p keep exactly the right tokens."""

from __future__ import annotations

import pytest
import torch

from hybridlm.generate import SamplingConfig, sample_next_token

DRAWS = 40000


def _frequencies(logits: torch.Tensor, config: SamplingConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    batch = logits.expand(DRAWS, -1)
    tokens = sample_next_token(batch, config, generator)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / DRAWS


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 11)
    assert torch.equal(sample_next_token(logits, SamplingConfig()), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    expected = (LOGITS[0].double() / temperature).softmax(-1)
    observed = _frequencies(LOGITS, SamplingConfig(temperature=temperature))
    assert float((observed - expected).abs().max()) < 0.01  # ~4 standard errors at 40k draws


def test_top_k_keeps_the_k_best_renormalised():
    observed = _frequencies(LOGITS, SamplingConfig(temperature=1.0, top_k=3))
    expected = torch.zeros(6, dtype=torch.float64)
    expected[:3] = LOGITS[0, :3].double().softmax(-1)
    assert float((observed - expected).abs().max()) < 0.01
    assert observed[3:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS[0].double().softmax(-1)  # ~0.61, 0.22, 0.14, 0.08, ...
    top_p = float(probs[:2].sum()) + 0.01  # needs the third token too
    observed = _frequencies(LOGITS, SamplingConfig(temperature=1.0, top_p=top_p))
    expected = torch.zeros(6, dtype=torch.float64)
    expected[:3] = probs[:3] / probs[:3].sum()
    assert float((observed - expected).abs().max()) < 0.01
    assert observed[3:].sum() == 0


def test_seeded_generator_reproduces_draws():
    logits = torch.randn(4, 50)
    config = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)
    first = sample_next_token(logits, config, torch.Generator().manual_seed(7))
    again = sample_next_token(logits, config, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)


@pytest.mark.parametrize("fields", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_options_are_rejected(fields):
    with pytest.raises(ValueError):
        SamplingConfig(**fields)
