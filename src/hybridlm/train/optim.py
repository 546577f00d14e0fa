"""AdamW with the usual no-decay set, the learning-rate schedules, and the skip-step guard."""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from hybridlm.train.config import OptimizerSection, ScheduleSection

# 1-D parameters are norms and biases; these names are decay/step-size parameters of the GDN gate
# (also 1-D, named explicitly so the rule survives a reshaped parameter).
NO_DECAY_NAMES = ("A_log", "dt_bias")
EMBEDDING_NAMES = ("model.embed_tokens.weight",)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (matrices and conv kernels) and not decayed (norms, biases,
    embeddings, A_log, dt_bias). A tied LM head shares the embedding and is not decayed."""
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or name in EMBEDDING_NAMES or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimizerSection, *, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=fused or None,
    )


def lr_at(step: int, peak_lr: float, total_steps: int, schedule: ScheduleSection) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly and reaches the peak at step warmup_steps - 1 (step 0 already trains at
    peak / warmup_steps). After warmup: cosine or linear from the peak to final_lr_ratio * peak at the
    last step; wsd holds the peak, then decays linearly over the last decay_fraction of all steps;
    wsds does the same within each period of `schedule.period_ends` (see wsds_decay_windows);
    constant holds the peak.
    """
    warmup = schedule.warmup_steps
    floor = schedule.final_lr_ratio * peak_lr
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule.name == "constant":
        return peak_lr
    if schedule.name == "wsds":
        for decay_start, end in wsds_decay_windows(schedule):
            if step < end:
                if step < decay_start:
                    return peak_lr
                return peak_lr + (floor - peak_lr) * (step - decay_start + 1) / (end - decay_start)
        return peak_lr
    if schedule.name == "wsd":
        decay_steps = max(1, round(schedule.decay_fraction * total_steps))
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return peak_lr + (floor - peak_lr) * progress
    span = total_steps - 1 - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if schedule.name == "linear":
        return peak_lr + (floor - peak_lr) * progress
    if schedule.name == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule.name!r}")


def wsds_decay_windows(schedule: ScheduleSection) -> list[tuple[int, int]]:
    """(decay_start, end) of each WSD-S period, in optimizer steps.

    Period k runs from the previous end (0 for the first) to period_ends[k]; its decay covers its last
    max(1, round(decay_fraction * period length)) steps. Steps decay_start .. end - 1 (0-based) decay,
    reaching final_lr_ratio * lr at step end - 1, so after `decay_start` steps the weights are
    pre-decay and after `end` steps post-decay. E.g. periods ending at 10, 20, 40, 80, 160 with
    decay_fraction 0.1 decay from 9, 19, 38, 76, 152 (TrainConfig.validate keeps the warmup out of
    the first decay).
    """
    windows, previous = [], 0
    for end in schedule.period_ends:
        length = end - previous
        decay_steps = min(length, max(1, round(schedule.decay_fraction * length)))
        windows.append((end - decay_steps, end))
        previous = end
    return windows


def wsds_decay_points(schedule: ScheduleSection) -> dict[int, tuple[str, int]]:
    """{step: ("pre_decay" or "post_decay", period index)}: where a WSD-S run evaluates and checkpoints.

    Empty for every other schedule. Keys are step counts after the update (the trainer's `step`).
    """
    if schedule.name != "wsds":
        return {}
    points = {}
    for period, (decay_start, end) in enumerate(wsds_decay_windows(schedule)):
        # A one-step period starts its decay at once: its pre-decay weights are the previous period's
        # post-decay weights, and that label is the one kept.
        points.setdefault(decay_start, ("pre_decay", period))
        points[end] = ("post_decay", period)
    return points


class SkipStepGuard:
    """Decides whether an optimizer step should be skipped (OLMo-core's SkipStepAdamW rule).

    A step is skipped when its loss or gradient norm is not finite, or (once `min_history` applied
    steps are known) more than `sigma` standard deviations above the mean of the last `window`
    applied steps. Skipped steps do not enter the history, so one spike cannot widen the band that
    judges the next. The trainer still advances the step counter, the schedule and the data: a
    skipped step consumes its batch, as if its update had been zero.
    """

    def __init__(self, *, sigma: float = 6.0, window: int = 128, min_history: int = 20, enabled: bool = True):
        self.sigma = sigma
        self.min_history = min_history
        self.enabled = enabled
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this step, or None to apply it (and record it in the history)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss {loss} or gradient norm {grad_norm}"
        if self.enabled and len(self.losses) >= self.min_history:
            for label, value, history in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.grad_norms)):
                mean, std = _mean_std(history)
                limit = mean + self.sigma * std
                if value > limit:
                    return f"{label} {value:.4g} above mean + {self.sigma:g} sigma = {limit:.4g} of the last {len(history)} steps"
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.grad_norms.clear()
        self.losses.extend(float(x) for x in state["losses"])
        self.grad_norms.extend(float(x) for x in state["grad_norms"])


def _mean_std(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
