"""The training loss: cross-entropy and z-loss, in float32, as sums (the caller normalises).

Training gets them from the model itself (`HybridLM.forward(labels=...)`, the fused LM-head loss
of `hybridlm.ops.lm_loss`, which never holds float32 logits); `language_model_loss_sums` computes
the same sums from logits, for models or callers that have logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossSums:
    """Sums over the target tokens of one micro-batch (float32 scalars, still in the graph).

    cross_entropy: sum of -log p(target) in nats; z_loss: sum of logsumexp(logits)^2;
    count: number of target tokens (labels != IGNORE_INDEX).
    """

    cross_entropy: torch.Tensor
    z_loss: torch.Tensor
    count: int


def model_loss_sums(model, input_ids: torch.Tensor, labels: torch.Tensor, **forward_kwargs) -> LossSums:
    """The loss sums of one micro-batch from `model(input_ids, labels=labels, **forward_kwargs)`
    (a HybridLM, possibly wrapped by FSDP: the LM head's weight is used inside its forward).
    labels may stay on the host: they are counted there (no device sync) and moved to input_ids' device."""
    count = int((labels != IGNORE_INDEX).sum())
    labels = labels.to(input_ids.device, non_blocking=True)
    output = model(input_ids, labels=labels, ignore_index=IGNORE_INDEX, **forward_kwargs)
    return LossSums(cross_entropy=output.cross_entropy_sum, z_loss=output.z_loss_sum, count=count)


def language_model_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> LossSums:
    """logits: [B, T, V] any float dtype; labels: [B, T] int64 next-token targets (IGNORE_INDEX to skip).

    Computed in float32 whatever the logits' dtype, so bf16 training gets an accurate loss and
    z-loss. The z-loss term (PaLM) keeps the softmax normaliser near 1: z * mean(logsumexp^2).
    """
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    log_normaliser = torch.logsumexp(logits, dim=-1)
    z_loss = (log_normaliser.pow(2) * keep).sum()
    return LossSums(cross_entropy=cross_entropy, z_loss=z_loss, count=int(keep.sum()))
