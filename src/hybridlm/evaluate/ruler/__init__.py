"""A RULER-style long-context suite generated locally: needle retrieval, variable tracking, word extraction."""

from hybridlm.evaluate.ruler.runner import (
    RulerRun,
    answer_losses,
    check_ruler_limits,
    comparison_table,
    plot_ruler,
    prepare_samples,
    ruler_table,
    run_ruler,
    write_ruler_outputs,
)
from hybridlm.evaluate.ruler.tasks import (
    HAYSTACKS,
    TASKS,
    TEMPLATES,
    RulerSample,
    answer_text,
    corpus_lines,
    generate_sample,
    resolve_tasks,
    score_prediction,
    task_names,
)

__all__ = [
    "HAYSTACKS",
    "TASKS",
    "TEMPLATES",
    "RulerRun",
    "answer_losses",
    "RulerSample",
    "answer_text",
    "check_ruler_limits",
    "comparison_table",
    "corpus_lines",
    "generate_sample",
    "plot_ruler",
    "prepare_samples",
    "resolve_tasks",
    "ruler_table",
    "run_ruler",
    "score_prediction",
    "task_names",
    "write_ruler_outputs",
]
