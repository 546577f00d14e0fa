"""Train/test splits where the test inputs are longer than any training input (length generalization)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from hybridlm.tasks.base import Example, Task
from hybridlm.tasks.registry import task_class


@dataclass
class LengthSplit:
    """Tasks and examples of a split. `valid` is drawn like `train` (in distribution), `test` is longer."""

    train_task: Task
    test_task: Task
    train: list[Example]
    test: list[Example]
    valid: list[Example] = field(default_factory=list)


def _resolve(task: str | type[Task] | Task, train_knobs: dict[str, Any] | None) -> Task:
    if isinstance(task, Task):
        if train_knobs:
            raise ValueError("pass either a Task instance or a task name with train_knobs, not both")
        return task
    cls = task_class(task) if isinstance(task, str) else task
    return cls(**(train_knobs or {}))


def longer_knobs(
    task: str | type[Task] | Task,
    train_knobs: dict[str, Any] | None = None,
    *,
    factor: float = 2.0,
    lengthen: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The knobs of a test set longer than training.

    Each lengthened knob with training range lo:hi becomes (hi + 1):max(hi + 1, floor(hi * factor)), capped at
    the knob's valid maximum; every other knob (vocabulary size, mode, ...) stays as in training, so the two
    sets share one vocabulary. `lengthen` defaults to all of the task's length knobs (see `hybridlm tasks list`).
    """
    train_task = _resolve(task, train_knobs)
    length_knobs = [spec.name for spec in train_task.knob_specs if spec.length]
    names = length_knobs if lengthen is None else list(lengthen)
    for name in names:
        if name not in length_knobs:
            raise ValueError(f"{name!r} is not a length knob of {train_task.name!r}; its length knobs are: "
                             f"{', '.join(length_knobs)}")
    if not factor > 1:
        raise ValueError(f"factor must be > 1 (the test's longest size is hi * factor); got {factor}")
    knobs = dict(train_task.knobs)
    for name in names:
        spec = train_task.knob(name)
        high = knobs[name][1]
        if high + 1 > spec.high:
            raise ValueError(f"{name} already reaches its maximum {spec.high} in training; nothing longer exists")
        knobs[name] = (high + 1, min(spec.high, max(high + 1, math.floor(high * factor))))
    return knobs


def length_split(
    task: str | type[Task] | Task,
    train_knobs: dict[str, Any] | None = None,
    *,
    n_train: int,
    n_test: int,
    n_valid: int = 0,
    seed: int = 0,
    factor: float = 2.0,
    lengthen: Sequence[str] | None = None,
) -> LengthSplit:
    """Sample a training set with `train_knobs` and a test set with `longer_knobs(...)`.

    Streams: train is `train_task.dataset(n_train, seed)`; test and valid (training knobs, in distribution)
    come from the task's streams 1 and 2 of the same seed.
    """
    train_task = _resolve(task, train_knobs)
    test_task = type(train_task)(**longer_knobs(train_task, factor=factor, lengthen=lengthen))
    if test_task.vocab != train_task.vocab:
        raise ValueError(
            f"the longer test set of {train_task.name!r} needs a larger vocabulary ({test_task.vocab_size} tokens) "
            f"than training ({train_task.vocab_size}); raise the vocabulary knob (e.g. max_bits) in train_knobs"
        )
    return LengthSplit(
        train_task=train_task,
        test_task=test_task,
        train=train_task.dataset(n_train, seed),
        test=test_task.dataset(n_test, train_task.rng(seed, 1)),
        valid=train_task.dataset(n_valid, train_task.rng(seed, 2)),
    )
