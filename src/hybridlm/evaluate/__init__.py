"""Evaluation: held-out loss and bits per byte (with loss by position), a RULER-style long-context
suite, and an lm-evaluation-harness model (`hybridlm.evaluate.harness`, imported on demand because
it needs the optional `lm_eval` package)."""

from hybridlm.evaluate.limits import check_length, check_memory
from hybridlm.evaluate.loss import LossResult, evaluate_loss, open_dataset, plot_loss_by_position
from hybridlm.evaluate.ruler import (
    TASKS as RULER_TASKS,
    RulerRun,
    RulerSample,
    check_ruler_limits,
    generate_sample,
    prepare_samples,
    run_ruler,
    score_prediction,
    write_ruler_outputs,
)

__all__ = [
    "RULER_TASKS",
    "LossResult",
    "RulerRun",
    "RulerSample",
    "check_length",
    "check_memory",
    "check_ruler_limits",
    "evaluate_loss",
    "generate_sample",
    "open_dataset",
    "plot_loss_by_position",
    "prepare_samples",
    "run_ruler",
    "score_prediction",
    "write_ruler_outputs",
]
