"""All tasks by name: `TASKS` and `get_task(name, **knobs)`."""

from __future__ import annotations

from typing import Any

from hybridlm.tasks.base import Task
from hybridlm.tasks.boolean_formula import BooleanFormula
from hybridlm.tasks.counting import ModularCounting, Parity
from hybridlm.tasks.mqar import MultiQueryRecall
from hybridlm.tasks.state_recall import BitRecall, StateBasedRecall, StateTracking
from hybridlm.tasks.word_problems import WordProblem

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (
        Parity,
        ModularCounting,
        WordProblem,
        MultiQueryRecall,
        StateBasedRecall,
        StateTracking,
        BitRecall,
        BooleanFormula,
    )
}


def task_class(name: str) -> type[Task]:
    """The task class called `name`; ValueError listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def get_task(name: str, **knobs: Any) -> Task:
    """The task `name` with the given knobs (others at their defaults), e.g. get_task("state_recall", n=(4, 8))."""
    return task_class(name)(**knobs)
