"""Synthetic expressivity tasks: seeded generators with a code-like text form and a token form.

    from hybridlm.tasks import get_task, collate, accuracy
    task = get_task("state_recall", m=(16, 32), n=(4, 16))
    examples = task.dataset(1000, seed=0)
    batch = collate(examples)                 # input_ids / targets / attention_mask, [B, T] int64
    accuracy(examples, logits.argmax(-1))     # exact match over every supervised position

Tasks (see `hybridlm tasks list`): parity, modular_counting, word_problem (S5, A5, A4xZ5, Z60), mqar,
state_recall with its halves state_tracking and bit_recall, boolean_formula.
"""

from hybridlm.tasks.base import IGNORE_INDEX, PAD_ID, PAD_TOKEN, Example, Knob, Task, Vocabulary, code_tokens
from hybridlm.tasks.batching import Batch, accuracy, collate, exact_matches
from hybridlm.tasks.boolean_formula import BooleanFormula
from hybridlm.tasks.counting import ModularCounting, Parity
from hybridlm.tasks.groups import GROUP_NAMES, Group, get_group
from hybridlm.tasks.mqar import MultiQueryRecall
from hybridlm.tasks.registry import TASKS, get_task, task_class
from hybridlm.tasks.splits import LengthSplit, length_split, longer_knobs
from hybridlm.tasks.state_recall import BitRecall, StateBasedRecall, StateTracking
from hybridlm.tasks.word_problems import WordProblem

__all__ = [
    "GROUP_NAMES",
    "IGNORE_INDEX",
    "PAD_ID",
    "PAD_TOKEN",
    "TASKS",
    "Batch",
    "BitRecall",
    "BooleanFormula",
    "Example",
    "Group",
    "Knob",
    "LengthSplit",
    "ModularCounting",
    "MultiQueryRecall",
    "Parity",
    "StateBasedRecall",
    "StateTracking",
    "Task",
    "Vocabulary",
    "WordProblem",
    "accuracy",
    "code_tokens",
    "collate",
    "exact_matches",
    "get_group",
    "get_task",
    "length_split",
    "longer_knobs",
    "task_class",
]
