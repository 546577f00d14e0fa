"""Running the RULER-style suite through the inference engine, and its tables and plots.

    samples = prepare_samples(["niah_single", "vt"], [4096, 8192], tokenizer=tok, samples=20, seed=0)
    check_ruler_limits(model, [4096, 8192], batch_size=4)          # before any generation
    run = run_ruler(model, tok, samples, batch_size=4, name="my-model")
    run.scores["niah_single"][8192]                                 # 0..100, RULER's string_match_all
    write_ruler_outputs([run], "out/")                              # results.json, table.md, ruler.png, samples

Answers are generated greedily by `HybridLM.generate` (batched, left-padded prompts), up to the
task's max_new_tokens, stopping at the end-of-text token. For tasks with ordered answers, the answer
loss (nats of the reference answer after the prompt, teacher-forced) is measured as well, with one
forward pass per batch: lower is better, and it moves long before exact match leaves zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hybridlm.evaluate.limits import check_length, check_memory, generation_memory, parameter_bytes
from hybridlm.evaluate.ruler.tasks import TASKS, RulerSample, answer_text, generate_sample, score_prediction

PREFILL_CHUNK_TOKENS = 8192


@dataclass
class RulerRun:
    """Scores of one model: scores[task][length] and exact[task][length] in percent; answer_loss[task][length]
    the mean answer loss in nats (ordered tasks only); records: one dict per sample (task, length, index,
    prompt_tokens, answers, prediction, score, answer_loss)."""

    name: str
    scores: dict[str, dict[int, float]] = field(default_factory=dict)
    exact: dict[str, dict[int, float]] = field(default_factory=dict)
    answer_loss: dict[str, dict[int, float]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def average(self, length: int) -> float:
        """Mean score over the tasks run at `length`."""
        values = [by_length[length] for by_length in self.scores.values() if length in by_length]
        return sum(values) / len(values)

    def average_answer_loss(self, length: int) -> float | None:
        values = [by_length[length] for by_length in self.answer_loss.values() if length in by_length]
        return sum(values) / len(values) if values else None

    def lengths(self) -> list[int]:
        return sorted({length for by_length in self.scores.values() for length in by_length})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "scores": {task: {str(k): v for k, v in by.items()} for task, by in self.scores.items()},
            "exact": {task: {str(k): v for k, v in by.items()} for task, by in self.exact.items()},
            "answer_loss": {task: {str(k): v for k, v in by.items()} for task, by in self.answer_loss.items()},
            "average": {str(length): self.average(length) for length in self.lengths()},
            "average_answer_loss": {str(length): self.average_answer_loss(length) for length in self.lengths()},
        }


def prepare_samples(
    tasks: list[str],
    lengths: list[int],
    *,
    tokenizer,
    samples: int,
    seed: int = 0,
    template: str = "text",
    haystack: str = "noise",
    corpus: list[str] | None = None,
    value_kind: str = "number",
) -> dict[tuple[str, int], list[RulerSample]]:
    """Every sample of every (task, length), generated up front so that a task that does not fit a length
    fails before any model work."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    out = {}
    for length in lengths:
        for task in tasks:
            out[(task, length)] = [
                generate_sample(task, length=length, index=index, seed=seed, tokenizer=tokenizer, template=template,
                                haystack=haystack, corpus=corpus, value_kind=value_kind)
                for index in range(samples)
            ]
    return out


def check_ruler_limits(model, lengths: list[int], *, batch_size: int) -> None:
    """Refuse lengths beyond the model's max_seq_len or beyond what fits in memory at this batch size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    for length in lengths:
        check_length(model.config, length)
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    longest = max(lengths)
    needed = parameter_bytes(model) + generation_memory(
        model.config, batch_size, longest, prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, dtype=dtype
    )
    check_memory(needed, device, what=f"generating at length {longest} with batch size {batch_size}",
                 hint="lower --batch-size or the longest of --lengths")


@torch.no_grad()
def answer_losses(model, tokenizer, samples: list[RulerSample]) -> list[float]:
    """Negative log-likelihood (nats) of answer_text(sample.answers) right after each prompt, teacher-forced.

    The batch is left-padded and run through the decoding cache in chunks of PREFILL_CHUNK_TOKENS / batch
    positions, as the engine's prefill is, so memory stays within what `check_ruler_limits` allowed; only
    the last chunk, which holds every answer position, computes logits."""
    rows, answer_lengths = [], []
    for sample in samples:
        prompt_ids = tokenizer.encode(sample.prompt)
        whole = tokenizer.encode(sample.prompt + answer_text(sample.answers))
        if whole[: len(prompt_ids)] != prompt_ids:  # a merge across the boundary: tokenize the parts apart
            whole = prompt_ids + tokenizer.encode(answer_text(sample.answers))
        rows.append(whole)
        answer_lengths.append(len(whole) - len(prompt_ids))
    width = max(len(row) for row in rows) - 1
    device = model.lm_head.weight.device
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, width - len(row) + 1 :] = torch.tensor(row[:-1])
        mask[index, width - len(row) + 1 :] = True
    keep = max(answer_lengths)
    ids, mask = ids.to(device), mask.to(device)
    padded = not bool(mask.all())
    cache = model.allocate_cache(len(rows), width)
    chunk = max(1, PREFILL_CHUNK_TOKENS // len(rows))
    starts = [*range(0, width - keep, chunk), width - keep]
    for start, end in zip(starts, [*starts[1:], width]):
        output = model(ids[:, start:end], attention_mask=mask[:, start:end] if padded else None, cache=cache,
                       logits_to_keep=keep, compute_logits=end == width)
    log_probs = F.log_softmax(output.logits.float(), dim=-1)
    losses = []
    for index, (row, count) in enumerate(zip(rows, answer_lengths)):
        targets = torch.tensor(row[-count:], device=device)
        losses.append(-float(log_probs[index, keep - count :].gather(1, targets[:, None]).sum()))
    return losses


def run_ruler(model, tokenizer, samples: dict[tuple[str, int], list[RulerSample]], *, batch_size: int = 4,
              name: str = "model", progress=None) -> RulerRun:
    """Generate an answer for every sample and score it (and measure the answer loss of ordered tasks).
    progress: optional callable(task, length, score)."""
    run = RulerRun(name)
    eos = tokenizer.eos_token_id
    for (task, length), group in samples.items():
        total = exact = loss_total = 0.0
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            losses = answer_losses(model, tokenizer, batch) if TASKS[task].ordered else [None] * len(batch)
            generated = model.generate(
                [tokenizer.encode(sample.prompt) for sample in batch],
                max_new_tokens=TASKS[task].max_new_tokens,
                temperature=0.0,
                stop_token_ids=[eos],
                prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
            )
            for sample, ids, loss in zip(batch, generated, losses):
                prediction = tokenizer.decode(ids, skip_special_tokens=True)
                score = score_prediction(prediction, sample.answers)
                total += score
                exact += score == 1.0
                loss_total += loss or 0.0
                run.records.append({
                    "task": task, "length": length, "index": sample.index, "prompt_tokens": sample.prompt_tokens,
                    "answers": sample.answers, "prediction": prediction, "score": score, "answer_loss": loss,
                })
        run.scores.setdefault(task, {})[length] = 100.0 * total / len(group)
        run.exact.setdefault(task, {})[length] = 100.0 * exact / len(group)
        if TASKS[task].ordered:
            run.answer_loss.setdefault(task, {})[length] = loss_total / len(group)
        if progress is not None:
            progress(task, length, run.scores[task][length])
    return run


def _metric(run: RulerRun, metric: str) -> tuple[dict[str, dict[int, float]], Callable[[int], float | None]]:
    """(per-task values, average over tasks at a length) of "score" or "answer_loss"."""
    if metric == "score":
        return run.scores, run.average
    return run.answer_loss, run.average_answer_loss


def ruler_table(run: RulerRun, metric: str = "score") -> str:
    """Markdown table: one row per task plus the average, one column per length (score in percent, or the
    answer loss in nats)."""
    by_task, average = _metric(run, metric)
    lengths = run.lengths()
    lines = ["| task | " + " | ".join(str(length) for length in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for task, by_length in by_task.items():
        lines.append(f"| {task} | " + " | ".join(f"{by_length[length]:.1f}" if length in by_length else "-"
                                                 for length in lengths) + " |")
    lines.append("| **average** | " + " | ".join(f"**{average(length):.1f}**" if average(length) is not None
                                                  else "-" for length in lengths) + " |")
    return "\n".join(lines)


def comparison_table(runs: list[RulerRun], metric: str = "score") -> str:
    """Markdown table of the average over tasks: one row per model, one column per length."""
    lengths = sorted({length for run in runs for length in run.lengths()})
    lines = ["| model | " + " | ".join(str(length) for length in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for run in runs:
        average = _metric(run, metric)[1]
        cells = [f"{average(length):.1f}" if length in run.lengths() and average(length) is not None else "-"
                 for length in lengths]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ruler(runs: list[RulerRun], path: str | Path, *, metric: str = "score",
               train_lengths: dict[str, int | None] | None = None) -> Path:
    """One panel per task plus the average: the metric against length (log2 axis), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(task for run in runs for task in _metric(run, metric)[0]))
    panels = ["average", *tasks]
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    train_lengths = train_lengths or {}
    for panel, axis in zip(panels, axes.flat):
        for index, run in enumerate(runs):
            by_task, average = _metric(run, metric)
            if panel == "average":
                points = [(n, average(n)) for n in run.lengths() if average(n) is not None]
            else:
                points = sorted(by_task.get(panel, {}).items())
            if points:
                axis.plot(*zip(*points), marker="o", color=f"C{index}", label=run.name)
            trained = train_lengths.get(run.name)
            if trained:
                axis.axvline(trained, color=f"C{index}", linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        if metric == "score":
            axis.set_ylim(-3, 103)
        axis.set_title(panel, fontsize=10)
        axis.set_xlabel("length (tokens)", fontsize=8)
        axis.grid(True, alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].set_ylabel("score (%)" if metric == "score" else "answer loss (nats, lower is better)")
    axes.flat[0].legend(fontsize=7)
    title = "RULER-style suite" if metric == "score" else "RULER-style suite: answer loss"
    figure.suptitle(f"{title} (dotted: training length)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_ruler_outputs(runs: list[RulerRun], out_dir: str | Path, *, settings: dict | None = None,
                        train_lengths: dict[str, int | None] | None = None) -> dict[str, Path]:
    """results.json (scores, answer losses, settings), table.md, ruler.png, answer_loss.png (when any task
    has an answer loss) and samples-NAME.jsonl per model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json", "table": out_dir / "table.md", "plot": out_dir / "ruler.png"}
    paths["results"].write_text(json.dumps({"settings": settings or {}, "models": [run.to_dict() for run in runs]},
                                           indent=1) + "\n")
    has_loss = any(run.answer_loss for run in runs)
    sections = []
    if len(runs) > 1:
        sections.append("Average score (%) by model and length\n\n" + comparison_table(runs))
        if has_loss:
            sections.append("Average answer loss (nats, lower is better) by model and length\n\n"
                            + comparison_table(runs, "answer_loss"))
    for run in runs:
        sections.append(f"{run.name}: score (%) by task and length\n\n" + ruler_table(run))
        if run.answer_loss:
            sections.append(f"{run.name}: answer loss (nats) by task and length\n\n" + ruler_table(run, "answer_loss"))
    paths["table"].write_text("\n\n".join(sections) + "\n")
    plot_ruler(runs, paths["plot"], train_lengths=train_lengths)
    if has_loss:
        paths["answer_loss_plot"] = plot_ruler(runs, out_dir / "answer_loss.png", metric="answer_loss",
                                               train_lengths=train_lengths)
    for run in runs:
        samples_path = out_dir / f"samples-{run.name}.jsonl"
        with open(samples_path, "w") as handle:
            for record in run.records:
                handle.write(json.dumps(record) + "\n")
        paths[f"samples-{run.name}"] = samples_path
    return paths
