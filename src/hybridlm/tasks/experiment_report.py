"""Tables (Markdown) and plots (PNG) of an expressivity grid's results; see `hybridlm.tasks.experiments`.

Accuracy cells read `mean ± spread` over seeds, where spread = (max - min) / 2, so the interval covers every
seed; a single seed shows its value alone.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from hybridlm.tasks.experiments import ARCHITECTURES, Grid

SPLITS = (("id", "in-distribution"), ("ood", "longer than training"))


def _by_cell(records: Sequence[dict]) -> dict[tuple[str, str, str], list[dict]]:
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for record in records:
        cells[record["task"], record["difficulty"], record["arch"]].append(record)
    return cells


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2


def format_cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, spread = mean_spread(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {spread:.2f}"


def _rows(grid: Grid, records: Sequence[dict]) -> list[tuple[str, str]]:
    """(task, difficulty) pairs in grid order, limited to those with records."""
    present = {(record["task"], record["difficulty"]) for record in records}
    rows = []
    for setting in grid.tasks:
        for level in setting.levels:
            row = (setting.name, setting.level_label(level))
            if row in present:
                rows.append(row)
    return rows


def parameter_table(grid: Grid, records: Sequence[dict]) -> str:
    """One row per architecture: layout, widths and the non-embedding parameter count (task independent)."""
    first = {}
    for record in records:
        first.setdefault(record["arch"], record)
    reference = first.get("transformer", next(iter(first.values()), None))
    lines = ["| architecture | layout | d_model | MLP width | non-embedding params | vs transformer |",
             "|---|---|---|---|---|---|"]
    for arch in grid.archs:
        if arch not in first:
            continue
        record = first[arch]
        ratio = record["params_non_embedding"] / reference["params_non_embedding"] - 1
        lines.append(f"| {arch} | {record['layout']} | {record['d_model']} | {record['mlp_hidden']} | "
                     f"{record['params_non_embedding']:,} | {ratio:+.1%} |")
    return "\n".join(lines)


def accuracy_table(grid: Grid, records: Sequence[dict], split: str) -> str:
    """Rows (task, difficulty), columns architectures; exact-match accuracy on the split ("id" or "ood")."""
    cells = _by_cell(records)
    archs = [arch for arch in grid.archs if any(record["arch"] == arch for record in records)]
    header = "| task | trained on |" + ("" if split == "id" else " tested on |")
    lines = [header + "".join(f" {arch} |" for arch in archs),
             "|---|---|" + ("" if split == "id" else "---|") + "---|" * len(archs)]
    for task, difficulty in _rows(grid, records):
        runs = [record for arch in archs for record in cells[task, difficulty, arch]]
        if split == "ood" and all(record["ood_accuracy"] is None for record in runs):
            continue
        row = f"| {task} | {difficulty} |"
        if split == "ood":
            row += f" {_test_label(runs[0])} |"
        for arch in archs:
            values = [record[f"{split}_accuracy"] for record in cells[task, difficulty, arch]
                      if record[f"{split}_accuracy"] is not None]
            row += f" {format_cell(values)} |"
        lines.append(row)
    return "\n".join(lines)


def _test_label(record: dict) -> str:
    """The knobs the longer test set changed, e.g. "n=5:8"."""
    changed = []
    for name, value in record["test_knobs"].items():
        if value != record["train_knobs"][name]:
            text = f"{value[0]}:{value[1]}" if isinstance(value, list) and value[0] != value[1] else (
                str(value[0]) if isinstance(value, list) else str(value))
            changed.append(f"{name}={text}")
    return ", ".join(changed)


def tables_markdown(grid: Grid, records: Sequence[dict]) -> str:
    seeds = sorted({record["seed"] for record in records})
    recipe = grid.recipe
    parts = [
        f"# Expressivity grid `{grid.name}`",
        "",
        (f"{grid.description}. " if grid.description else "") +
        f"Seeds {', '.join(map(str, seeds))}; {recipe.steps} steps of {recipe.batch_size} "
        f"examples, AdamW lr {recipe.lr:g} (warmup {recipe.warmup_fraction:.0%}, cosine to 10%), "
        f"{recipe.eval_examples} test examples per split. Accuracy is exact match (every supervised position "
        f"right), mean ± (max - min) / 2 over seeds.",
        "",
        "## Parameters (matched on non-embedding count by the MLP width)",
        "",
        parameter_table(grid, records),
    ]
    for split, title in SPLITS:
        table = accuracy_table(grid, records, split)
        parts += ["", f"## Accuracy, {title}", "", table]
    return "\n".join(parts) + "\n"


def plot_accuracy(grid: Grid, records: Sequence[dict], split: str, path: Path) -> None:
    """Accuracy vs difficulty, one panel per task, one line per architecture (error bars: seed min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _by_cell(records)
    settings = [s for s in grid.tasks if any(record["task"] == s.name and record[f"{split}_accuracy"] is not None
                                              for record in records)]
    columns = min(3, max(1, len(settings)))
    rows = max(1, -(-len(settings) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis in axes.flat[len(settings):]:
        axis.set_visible(False)
    markers = "osD^vP*X"
    for axis, setting in zip(axes.flat, settings):
        labels = [setting.level_label(level) for level in setting.levels]
        for index, arch in enumerate(grid.archs):
            xs, means, low, high = [], [], [], []
            for x, label in enumerate(labels):
                values = [record[f"{split}_accuracy"] for record in cells[setting.name, label, arch]
                          if record[f"{split}_accuracy"] is not None]
                if values:
                    mean = sum(values) / len(values)
                    xs.append(x)
                    means.append(mean)
                    low.append(mean - min(values))
                    high.append(max(values) - mean)
            if xs:
                offset = (index - (len(grid.archs) - 1) / 2) * 0.04  # keep overlapping points apart
                axis.errorbar([x + offset for x in xs], means, yerr=[low, high], marker=markers[index % len(markers)],
                              capsize=3, label=arch)
        axis.set_xticks(range(len(labels)), labels, fontsize=8)
        axis.set_ylim(-0.03, 1.03)
        axis.set_title(setting.name, fontsize=10)
        axis.set_ylabel("exact-match accuracy")
        axis.grid(alpha=0.3)
    if settings:
        handles, names = axes.flat[0].get_legend_handles_labels()
        figure.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8)
    title = dict(SPLITS)[split]
    figure.suptitle(f"grid {grid.name}: accuracy, {title} (train on the difficulty shown; mean, min-max over seeds)",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(grid: Grid, records: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """tables.md and accuracy_id.png / accuracy_ood.png (the latter only if some run has a longer test)."""
    out_dir = Path(out_dir)
    unknown = sorted({record["arch"] for record in records} - set(ARCHITECTURES))
    if unknown:
        raise ValueError(f"records name unknown architectures {unknown}; valid: {', '.join(ARCHITECTURES)}")
    paths = [out_dir / "tables.md"]
    paths[0].write_text(tables_markdown(grid, records))
    for split, _ in SPLITS:
        if any(record[f"{split}_accuracy"] is not None for record in records):
            path = out_dir / f"accuracy_{split}.png"
            plot_accuracy(grid, records, split, path)
            paths.append(path)
    return paths
