"""Batches of examples as padded tensors, and exact-answer accuracy of model predictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hybridlm.tasks.base import IGNORE_INDEX, PAD_ID, Example


@dataclass
class Batch:
    """Right-padded tensors for B examples of at most T tokens.

    input_ids: [B, T] int64, PAD (0) after each example's tokens.
    targets: [B, T] int64, -100 where unsupervised and on padding.
    attention_mask: [B, T] int64, 1 on real tokens and 0 on padding.

    Padding sits after every real token, so a causal model's outputs at real positions never depend on it:
    train and score with `input_ids` alone and let the -100 targets drop the padded positions. (HybridLM's
    `attention_mask` argument is for left padding; do not pass this right-padded mask to it.)
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.targets.to(device), self.attention_mask.to(device))


def collate(examples: Sequence[Example], pad_to: int | None = None) -> Batch:
    """Stack examples into a right-padded `Batch`; T is the longest example, or `pad_to` if given."""
    if len(examples) == 0:
        raise ValueError("collate needs at least one example")
    longest = max(len(example) for example in examples)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens); "
                         f"raise pad_to or leave it None")
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.int64)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.int64)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.int64)
        targets[row, :length] = torch.tensor(example.targets, dtype=torch.int64)
        attention_mask[row, :length] = 1
    return Batch(input_ids, targets, attention_mask)


def exact_matches(examples: Sequence[Example], predictions: torch.Tensor | Sequence[Sequence[int]]) -> list[bool]:
    """Per example: True iff the predicted token equals the target at every supervised position.

    predictions: [B, T'] predicted token ids (argmax of the logits), row b aligned with `examples[b]`'s
        positions as in `collate` (T' at least each example's length; columns beyond it are ignored).
    """
    if isinstance(predictions, torch.Tensor):
        if predictions.dim() != 2 or predictions.dtype.is_floating_point:
            raise ValueError(f"predictions must be [B, T] token ids (take logits.argmax(-1)); got a tensor of "
                             f"shape {tuple(predictions.shape)} and dtype {predictions.dtype}")
        predictions = predictions.tolist()
    if len(predictions) != len(examples):
        raise ValueError(f"got {len(predictions)} prediction rows for {len(examples)} examples; expected one each")
    matches = []
    for row, (example, predicted) in enumerate(zip(examples, predictions)):
        if len(predicted) < len(example):
            raise ValueError(f"prediction row {row} has {len(predicted)} positions but example {row} has "
                             f"{len(example)} tokens; predict over the whole collated batch")
        matches.append(all(int(predicted[t]) == target for t, target in enumerate(example.targets)
                           if target != IGNORE_INDEX))
    return matches


def accuracy(examples: Sequence[Example], predictions: torch.Tensor | Sequence[Sequence[int]]) -> float:
    """The fraction of examples answered exactly (every supervised position right); see `exact_matches`."""
    if len(examples) == 0:
        raise ValueError("accuracy of no examples is undefined; pass at least one example")
    matches = exact_matches(examples, predictions)
    return sum(matches) / len(matches)
