"""Scaling-ladder plans and runs: one training config per (architecture, size, token multiplier) that
follows the ladder recipe, the runs that produce them, and the results.csv that `hybridlm fit` reads.

The recipe (reference architecture.md section 15.4), with N the non-embedding parameters of the actual
architecture (LM head included, input embedding excluded; counted by building the model on the meta
device, so a hybrid's larger GDN layers count):

    tokens D        multiplier x 20 x N (rounded up to whole optimizer steps)
    global batch    round(2048 * 160 * (N / 108M)^(2/3)) tokens, rounded to whole sequences of seq_len
    peak lr         0.0047 * (N / 108M)^(-1/3) / 2
    Adam betas      (0.9, 0.95) if the batch holds >= 524,288 tokens, else (0.9, 0.99)
    warmup          N tokens (rounded up to whole steps)
    schedule        WSD-S: one period per multiplier, ending at its D; each period holds the peak lr and
                    decays it linearly to 0 over its last 10%; the next period starts again at the peak
                    from the decayed weights; evaluation and checkpoint before and after every decay
    other           weight decay 0.1, z-loss 1e-5, gradient clip 1.0

Design: one config per (size, multiplier), one run per size.
    Under WSD-S the learning rate up to the end of period k does not depend on the later periods, so
    the config of multiplier m_k (periods ending at the D of m_1 .. m_k) is exactly a prefix of the
    config of the largest multiplier: the same initialisation, the same data order and the same learning
    rate at every step. Training the largest multiplier's config therefore passes through the final
    state of every smaller one, and its evaluation right after the k-th decay *is* the result of m_k's
    config (tests/scaling/test_ladder.py checks this bit for bit on CPU). So `plan_ladder` writes a
    standalone config per (size, multiplier), each one accepted by `hybridlm train` as it is, while
    `run_ladder` trains only the largest multiplier of each (architecture, size) and reads the smaller
    ones from its post-decay evaluations: the multipliers 0.5, 1, 2, 4, 8 cost 8 x 20 N tokens instead
    of 15.5 x 20 N. Adding a larger multiplier later extends the finished run (it resumes from its
    last checkpoint with the longer schedule) instead of starting again.

A plan directory:

    plan.json                                 the recipe and every run and point (N, batch, lr, steps, ...)
    configs/{arch}-{size}-x{multiplier}.yaml  one training config per point
    runs/{arch}-{size}/                       the WSD-S run of each (arch, size) (`hybridlm train` layout)
    results.csv                               arch,N,D,loss + extras, one row per finished point

Sizes: the ladder's dolma2 sizes 60m .. 1b (`hybridlm.models.presets.SIZES`, sequence length 8192),
and micro sizes d16 .. d256 for CPU (and small GPU) ladders (MICRO_SIZES: the name is d_model; the
same shape rules at head dim 16, with the sliding window scaled to half the sequence as the ladder's
4096 of 8192; sequence length 128; data: the stdlib corpus with a 512-token BPE, `embedded:512`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

# The recipe's constants (reference section 15.4).
REFERENCE_N = 108e6
REFERENCE_BATCH_TOKENS = 2048 * 160
REFERENCE_LR = 0.0047
LARGE_BATCH_TOKENS = 524_288  # beta2 0.95 at or above this batch, 0.99 below
TOKENS_PER_PARAM = 20
DEFAULT_MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
DECAY_FRACTION = 0.1
WEIGHT_DECAY = 0.1
Z_LOSS = 1e-5
GRAD_CLIP = 1.0

LADDER_SIZES = ("60m", "100m", "190m", "370m", "600m", "760m", "1b")
LADDER_SEQ_LEN = 8192
LADDER_VOCAB = 100352
LADDER_DATASET = "data/dolma2-tokenized"

# Micro sizes for CPU ladders: name -> (d_model, n_heads, n_layers, mlp_hidden). Head dim 16, MLP 4 d as in
# the ladder's base shapes, 4 layers so that every family keeps its pattern (GGGA, SSSA, ...).
MICRO_SIZES: dict[str, tuple[int, int, int, int]] = {
    "d16": (16, 1, 4, 64),
    "d32": (32, 2, 4, 128),
    "d48": (48, 3, 4, 192),
    "d64": (64, 4, 4, 256),
    "d80": (80, 5, 4, 320),
    "d96": (96, 6, 4, 384),
    "d128": (128, 8, 4, 512),
    "d192": (192, 12, 4, 768),
    "d256": (256, 16, 4, 1024),
}
MICRO_SEQ_LEN = 128
# The stdlib corpus with a 512-token BPE: at d_model 16..80 an 8192-token LM head would be most of N and of the
# compute (8192 x 80 = 655K parameters against 300K in the layers of d80).
MICRO_DATASET = "embedded:512"

# Config keys a plan computes from N and the multipliers; overriding them would break the plan's D points.
RECIPE_KEYS = {
    "data.batch_size": "the batch follows N; use --batch-multiple to round it",
    "data.seq_len": "use --seq-len",
    "data.dataset": "use --dataset",
    "model.vocab_size": "use --vocab-size",
    "schedule.name": "always wsds",
    "schedule.period_ends": "they follow --multipliers",
    "schedule.decay_fraction": "use --decay-fraction",
    "trainer.steps": "it follows the largest multiplier",
}

PLAN_FILE = "plan.json"
RESULTS_FILE = "results.csv"
CONFIGS_DIR = "configs"
RUNS_DIR = "runs"
PLAN_VERSION = 1


class LadderError(ValueError):
    """A ladder plan that cannot be made or run, with what was wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------------
# The recipe


def recipe_batch_tokens(N: float) -> int:
    """round(2048 * 160 * (N / 108M)^(2/3)): the global batch in tokens for N non-embedding parameters."""
    return round(REFERENCE_BATCH_TOKENS * (N / REFERENCE_N) ** (2 / 3))


def recipe_lr(N: float) -> float:
    """0.0047 * (N / 108M)^(-1/3) / 2: the peak learning rate for N non-embedding parameters."""
    return REFERENCE_LR * (N / REFERENCE_N) ** (-1 / 3) / 2


def recipe_beta2(batch_tokens: int) -> float:
    """Adam beta2: 0.95 for a batch of at least 524,288 tokens, 0.99 for smaller batches."""
    return 0.95 if batch_tokens >= LARGE_BATCH_TOKENS else 0.99


def batch_sequences(batch_tokens: int, seq_len: int, multiple: int = 1) -> int:
    """The recipe's batch in whole sequences: nearest multiple of `multiple` (at least one such multiple)."""
    return multiple * max(1, round(batch_tokens / (seq_len * multiple)))


def steps_for_tokens(tokens: Fraction | int, batch_tokens: int) -> int:
    """Optimizer steps to see at least `tokens` tokens at `batch_tokens` per step (ceiling, exact arithmetic)."""
    return math.ceil(Fraction(tokens) / batch_tokens)


def size_kind(size: str) -> str:
    """'ladder' for 60m .. 1b, 'micro' for d16 .. d128; LadderError for anything else."""
    if size in LADDER_SIZES:
        return "ladder"
    if size in MICRO_SIZES:
        return "micro"
    raise LadderError(f"unknown ladder size {size!r}; valid sizes: {', '.join(LADDER_SIZES)} (dolma2, sequence length "
                      f"{LADDER_SEQ_LEN}) or the CPU micro sizes {', '.join(MICRO_SIZES)}")


def model_section(arch: str, size: str, vocab_size: int, seq_len: int) -> dict[str, Any]:
    """The `model:` section of a ladder config: the preset {arch}-{size}, or for a micro size the
    {arch}-tiny preset with every shape field set (head dim 16, GDN key head dim 0.75 d/h rounded up to
    a multiple of 16 (= 16), value head dim twice that, sliding window seq_len / 2)."""
    from hybridlm.models.presets import FAMILIES

    if arch not in FAMILIES:
        raise LadderError(f"unknown architecture {arch!r}; valid architectures (model families): "
                          f"{', '.join(FAMILIES)}")
    if size_kind(size) == "ladder":
        return {"preset": f"{arch}-{size}", "vocab_size": vocab_size, "overrides": {}}
    d_model, n_heads, n_layers, mlp_hidden = MICRO_SIZES[size]
    key_head_dim = 16 * math.ceil(0.75 * d_model / n_heads / 16)
    overrides = {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": d_model // n_heads,
        "n_layers": n_layers,
        "mlp_hidden": mlp_hidden,
        "layer_pattern": FAMILIES[arch][1]["layer_pattern"],
        "gdn_key_heads": n_heads,
        "gdn_value_heads": n_heads,
        "gdn_key_head_dim": key_head_dim,
        "gdn_value_head_dim": 2 * key_head_dim,
        "sliding_window": max(1, seq_len // 2),
        "max_seq_len": max(seq_len, 256),
    }
    return {"preset": f"{arch}-tiny", "vocab_size": vocab_size, "overrides": overrides}


def non_embedding_parameters(config) -> int:
    """N of a TrainConfig's model (LM head included, input embedding excluded), counted on the meta device."""
    import torch

    from hybridlm.models import HybridLM

    with torch.device("meta"):
        return HybridLM(config.model_config()).num_parameters(exclude_embeddings=True)


# ----------------------------------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class LadderPoint:
    """One (size, multiplier): D = tokens after `steps` optimizer steps, read after the decay that ends there.

    target_tokens: multiplier x tokens_per_param x N before rounding up to whole steps; pre_decay_step: the
    step at which the decay of this point's period starts; config: its config file, relative to the plan.
    """

    multiplier: float
    target_tokens: int
    steps: int
    tokens: int
    pre_decay_step: int
    config: str


@dataclass(frozen=True)
class LadderRun:
    """The WSD-S run of one (architecture, size): its recipe numbers and its points, smallest first.

    batch_tokens = batch_sequences x seq_len is what the optimizer sees; recipe_batch_tokens is the formula's
    value before rounding to whole sequences. beta2 follows batch_tokens.
    """

    name: str
    arch: str
    size: str
    N: int
    seq_len: int
    recipe_batch_tokens: int
    batch_sequences: int
    batch_tokens: int
    lr: float
    beta2: float
    warmup_steps: int
    points: tuple[LadderPoint, ...]

    @property
    def steps(self) -> int:
        return self.points[-1].steps

    @property
    def flops(self) -> float:
        """6 N D of the whole run (the largest multiplier), in FLOPs."""
        return 6.0 * self.N * self.points[-1].tokens


@dataclass(frozen=True)
class LadderPlan:
    runs: tuple[LadderRun, ...]
    settings: dict[str, Any]


def parse_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise LadderError(f"{what}: empty list; expected comma-separated values")
    return items


def parse_multipliers(values: Sequence[float | str]) -> list[float]:
    """Positive multipliers, sorted ascending, no repeats."""
    multipliers = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LadderError(f"token multiplier {value!r} is not a number; expected e.g. 0.5,1,2,4,8") from None
        if not (number > 0 and math.isfinite(number)):
            raise LadderError(f"token multiplier {value!r} must be a finite positive number")
        multipliers.append(number)
    if len(set(multipliers)) != len(multipliers):
        raise LadderError(f"token multipliers {list(values)} repeat a value; give each multiplier once")
    return sorted(multipliers)


def normalise_size(size: str) -> str:
    return size.strip().lower()


def build_plan(
    archs: Sequence[str],
    sizes: Sequence[str],
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    *,
    dataset: str | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    decay_fraction: float = DECAY_FRACTION,
    eval_sequences: int = 256,
    keep_last: int = 0,
    batch_multiple: int = 1,
    overrides: Sequence[str] = (),
) -> tuple[LadderPlan, dict[str, Any]]:
    """The plan for every (arch, size) and its training configs {relative path: TrainConfig}.

    dataset: a prepared dataset directory, "embedded" (the stdlib corpus, 8192-token BPE) or
    "embedded:VOCAB" (the same corpus with a VOCAB-token BPE; prepared here if not cached yet). Default:
    data/dolma2-tokenized for ladder sizes, embedded:512 for micro sizes. seq_len default: 8192 / 128.
    vocab_size: the model vocabulary (default: the tokenizer's, rounded up to a multiple of 128; 100,352
    for ladder sizes when the dataset does not exist here). overrides: `section.key=value` applied to every
    config last (they win over the recipe, e.g. trainer.device=cpu).
    """
    from hybridlm.train.config import ConfigError, TrainConfig, apply_override

    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in RECIPE_KEYS:
            raise LadderError(f"--set {override}: {key} is fixed by the ladder recipe and the WSD-S periods "
                              f"({RECIPE_KEYS[key]})")
    if not archs:
        raise LadderError("no architecture given; expected e.g. --arch olmo3,hybrid")
    sizes = [normalise_size(s) for s in sizes]
    if not sizes:
        raise LadderError("no size given; expected e.g. --sizes 60M,100M,190M or d16,d32,d48")
    kinds = {size_kind(size) for size in sizes}
    if len(kinds) > 1:
        raise LadderError(f"sizes {sizes} mix the dolma2 ladder sizes and the CPU micro sizes; they use different "
                          "tokenizers and sequence lengths: plan them separately")
    if len(set(sizes)) != len(sizes) or len(set(archs)) != len(archs):
        raise LadderError(f"architectures {list(archs)} or sizes {sizes} repeat a value; give each once")
    kind = kinds.pop()
    multipliers = parse_multipliers(multipliers)
    if not tokens_per_param > 0:
        raise LadderError(f"tokens_per_param must be positive (got {tokens_per_param})")
    if not 0 < decay_fraction <= 1:
        raise LadderError(f"decay_fraction must lie in (0, 1] (got {decay_fraction})")
    if batch_multiple < 1:
        raise LadderError(f"batch_multiple must be >= 1 (got {batch_multiple})")
    seq_len = seq_len or (LADDER_SEQ_LEN if kind == "ladder" else MICRO_SEQ_LEN)
    if seq_len < 2:
        raise LadderError(f"seq_len must be at least 2 (got {seq_len})")
    dataset = dataset or (LADDER_DATASET if kind == "ladder" else MICRO_DATASET)
    dataset_path, vocab_size = _resolve_dataset(dataset, vocab_size, kind)

    runs, configs = [], {}
    for arch in archs:
        for size in sizes:
            values = {
                "model": model_section(arch, size, vocab_size, seq_len),
                "data": {"dataset": dataset_path, "seq_len": seq_len, "batch_size": 1},
            }
            for override in overrides:
                apply_override(values, override)
            try:
                N = non_embedding_parameters(TrainConfig.from_dict(values))
            except (ConfigError, ValueError) as error:
                raise LadderError(f"{arch}-{size}: {error}") from None
            run, run_configs = _plan_run(arch, size, N, values, multipliers, seq_len, tokens_per_param,
                                         decay_fraction, eval_sequences, keep_last, batch_multiple, kind, overrides)
            runs.append(run)
            configs.update(run_configs)
    settings = {
        "archs": list(archs),
        "sizes": sizes,
        "multipliers": multipliers,
        "dataset": dataset,
        "dataset_path": dataset_path,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "tokens_per_param": tokens_per_param,
        "decay_fraction": decay_fraction,
        "eval_sequences": eval_sequences,
        "keep_last": keep_last,
        "batch_multiple": batch_multiple,
        "overrides": list(overrides),
    }
    return LadderPlan(tuple(runs), settings), configs


def _resolve_dataset(dataset: str, vocab_size: int | None, kind: str) -> tuple[str, int]:
    """(the data.dataset value for the configs, the model vocabulary)."""
    from hybridlm.train.config import tokenizer_vocab_to_model_vocab

    tokenizer_vocab = None
    if dataset == "embedded":
        from hybridlm.data.embedded import EMBEDDED_VOCAB_SIZE

        tokenizer_vocab = EMBEDDED_VOCAB_SIZE
    elif dataset.startswith("embedded:"):
        try:
            embedded_vocab = int(dataset.partition(":")[2])
        except ValueError:
            raise LadderError(f"dataset {dataset!r}: expected embedded:VOCAB with an integer VOCAB, e.g. "
                              "embedded:512") from None
        from hybridlm.data.embedded import ensure_embedded_dataset

        dataset = str(ensure_embedded_dataset(vocab_size=embedded_vocab, progress=True))
    if tokenizer_vocab is None and (Path(dataset) / "meta.json").is_file():
        from hybridlm.data.dataset import TokenDataset

        tokenizer_vocab = TokenDataset(dataset).tokenizer.vocab_size
    if vocab_size is None:
        if tokenizer_vocab is not None:
            vocab_size = tokenizer_vocab_to_model_vocab(tokenizer_vocab)
        elif kind == "ladder":
            vocab_size = LADDER_VOCAB
        else:
            raise LadderError(f"dataset {dataset!r} is not a prepared dataset directory here, so its vocabulary is "
                              "unknown: prepare it first or give the model vocabulary (--vocab-size)")
    elif tokenizer_vocab is not None and vocab_size < tokenizer_vocab:
        raise LadderError(f"vocab_size {vocab_size} is smaller than the tokenizer of {dataset} ({tokenizer_vocab} "
                          "ids); leave it out (the default fits the tokenizer) or raise it")
    return dataset, vocab_size


def _plan_run(arch, size, N, values, multipliers, seq_len, tokens_per_param, decay_fraction, eval_sequences,
              keep_last, batch_multiple, kind, overrides):
    from hybridlm.train.config import ConfigError, TrainConfig, apply_override
    from hybridlm.train.optim import wsds_decay_windows

    name = f"{arch}-{size}"
    recipe_batch = recipe_batch_tokens(N)
    sequences = batch_sequences(recipe_batch, seq_len, batch_multiple)
    batch = sequences * seq_len
    lr, beta2 = recipe_lr(N), recipe_beta2(batch)
    targets = [Fraction(str(m)) * Fraction(str(tokens_per_param)) * N for m in multipliers]
    ends = [steps_for_tokens(t, batch) for t in targets]
    if any(a >= b for a, b in zip(ends, ends[1:])):
        raise LadderError(f"{name}: the multipliers {multipliers} end at steps {ends} of {batch:,} tokens; two "
                          "multipliers fall on the same step. Use multipliers further apart or a smaller batch")
    warmup = steps_for_tokens(N, batch)

    configs, points = {}, []
    for index, multiplier in enumerate(multipliers):
        config_values = json.loads(json.dumps(values))  # a deep copy
        config_values["data"]["batch_size"] = sequences
        config_values["optimizer"] = {"lr": lr, "betas": [0.9, beta2], "weight_decay": WEIGHT_DECAY,
                                      "z_loss": Z_LOSS, "grad_clip": GRAD_CLIP}
        config_values["schedule"] = {"name": "wsds", "warmup_steps": warmup, "final_lr_ratio": 0.0,
                                     "decay_fraction": decay_fraction, "period_ends": ends[: index + 1]}
        config_values["trainer"] = {
            "steps": ends[index],
            "eval_every": 0,
            "eval_sequences": eval_sequences,
            "checkpoint_every": 0,
            "keep_last": keep_last,
            "log_every": max(1, ends[-1] // 100),
            "sample_tokens": 0,
        }
        if kind == "ladder":
            config_values["trainer"].update(precision="bfloat16", compile=True, micro_batch_size=1)
        for override in overrides:  # the user's settings win over the recipe
            apply_override(config_values, override)
        try:
            config = TrainConfig.from_dict(config_values)
            config.validate()
        except (ConfigError, ValueError) as error:
            raise LadderError(f"{name} x{multiplier:g}: {error}") from None
        relative = f"{CONFIGS_DIR}/{name}-x{multiplier:g}.yaml"
        configs[relative] = config
        decay_start = wsds_decay_windows(config.schedule)[index][0]
        points.append(LadderPoint(multiplier, math.ceil(targets[index]), ends[index], ends[index] * batch,
                                  decay_start, relative))
    # What trains, after the user's overrides (which may depart from the recipe's lr, betas or warmup).
    final = configs[points[-1].config]
    return (LadderRun(name, arch, size, N, seq_len, recipe_batch, sequences, batch, final.optimizer.lr,
                      final.optimizer.betas[1], final.schedule.warmup_steps, tuple(points)), configs)


def write_plan(plan: LadderPlan, configs: dict[str, Any], directory: str | Path, *, command: str | None = None) -> Path:
    """Write plan.json and configs/*.yaml into `directory` (existing runs and results are left alone)."""
    directory = Path(directory)
    (directory / CONFIGS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in (directory / CONFIGS_DIR).glob("*.yaml"):  # from an earlier plan into this directory
        if f"{CONFIGS_DIR}/{stale.name}" not in configs:
            stale.unlink()
    for relative, config in configs.items():
        header = (f"# Scaling-ladder point (hybridlm.scaling.ladder): WSD-S, one period per token multiplier up to "
                  f"this one.\n# `hybridlm ladder run {directory}` trains only the largest multiplier of each size.\n")
        (directory / relative).write_text(header + config.to_yaml())
    document = {
        "version": PLAN_VERSION,
        "command": command,
        "recipe": {
            "batch_tokens": "round(2048 * 160 * (N / 108M)^(2/3))",
            "lr": "0.0047 * (N / 108M)^(-1/3) / 2",
            "beta2": "0.95 if batch_tokens >= 524288 else 0.99",
            "tokens": "multiplier * tokens_per_param * N",
            "warmup": "N tokens",
            "schedule": "WSD-S, linear decay to 0 over the last decay_fraction of each period",
        },
        "settings": plan.settings,
        "runs": [asdict(run) for run in plan.runs],
    }
    path = directory / PLAN_FILE
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def load_plan(directory: str | Path) -> LadderPlan:
    directory = Path(directory)
    path = directory / PLAN_FILE
    if not path.is_file():
        raise LadderError(f"{directory} holds no {PLAN_FILE}; make a plan first with `hybridlm ladder plan ... --out "
                          f"{directory}`")
    document = json.loads(path.read_text())
    if document.get("version") != PLAN_VERSION:
        raise LadderError(f"{path} has plan version {document.get('version')!r}; this hybridlm reads version "
                          f"{PLAN_VERSION}: plan again")
    runs = []
    for run in document["runs"]:
        points = tuple(LadderPoint(**point) for point in run.pop("points"))
        runs.append(LadderRun(**run, points=points))
    return LadderPlan(tuple(runs), document["settings"])


# ----------------------------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class PointResult:
    """The evaluations of one point, read from its run's metrics.jsonl (None while not reached)."""

    run: LadderRun
    point: LadderPoint
    loss: float | None
    bpb: float | None
    tokens: int | None
    pre_decay_loss: float | None
    elapsed_s: float | None


@dataclass(frozen=True)
class RunStatus:
    run: LadderRun
    step: int  # the newest logged step (0: not started)
    checkpoint_step: int  # the newest complete checkpoint (0: none)
    results: tuple[PointResult, ...]

    @property
    def done(self) -> bool:
        return all(result.loss is not None for result in self.results)

    @property
    def state(self) -> str:
        finished = sum(result.loss is not None for result in self.results)
        if self.done:
            return "done"
        if self.step == 0:
            return "not started"
        return f"partial: step {self.step:,}/{self.run.steps:,}, {finished}/{len(self.results)} points"


def run_directory(directory: str | Path, run: LadderRun) -> Path:
    return Path(directory) / RUNS_DIR / run.name


def run_status(directory: str | Path, run: LadderRun) -> RunStatus:
    from hybridlm.train.checkpoint import list_checkpoints
    from hybridlm.train.logging import read_metrics

    run_dir = run_directory(directory, run)
    records = read_metrics(run_dir)
    post = {r["step"]: r for r in records if r.get("decay_point") == "post_decay" and "val_loss" in r}
    pre = {r["step"]: r for r in records if r.get("decay_point") == "pre_decay" and "val_loss" in r}
    results = []
    for point in run.points:
        record = post.get(point.steps)
        before = pre.get(point.pre_decay_step)
        results.append(PointResult(
            run, point,
            loss=record["val_loss"] if record else None,
            bpb=record.get("val_bpb") if record else None,
            tokens=record["tokens"] if record else None,
            pre_decay_loss=before["val_loss"] if before else None,
            elapsed_s=record.get("elapsed_s") if record else None,
        ))
    checkpoints = list_checkpoints(run_dir)
    return RunStatus(run, max((r["step"] for r in records), default=0),
                     checkpoints[-1][0] if checkpoints else 0, tuple(results))


def ladder_status(directory: str | Path) -> list[RunStatus]:
    return [run_status(directory, run) for run in load_plan(directory).runs]


def run_ladder(
    directory: str | Path,
    *,
    only: Sequence[str] = (),
    workers: int = 1,
    threads: int | None = None,
    collect: bool = True,
    echo: Callable[[str], None] = print,
    progress: bool = False,
) -> list[RunStatus]:
    """Train every unfinished run of the plan in `directory` (only: just these run names), then write results.csv.

    A run whose every point has its post-decay evaluation is skipped; a run with checkpoints resumes from
    the newest one (with the plan's config, which may extend it with more periods). Under torchrun every
    rank calls this and trains the same runs in the same order; rank 0 writes results.csv.

    workers > 1 trains that many runs at once, each in its own `hybridlm ladder run --only NAME` process
    (largest first; its log in DIR/logs/NAME.log), with `threads` torch threads each (default: the cores
    divided among the workers). On a CPU, small models train several times faster as one single-threaded
    process per core than as one process with a thread per core. collect=False leaves results.csv alone.
    Returns the status of every run of the plan after training.
    """
    directory = Path(directory)
    plan = load_plan(directory)
    names = [run.name for run in plan.runs]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise LadderError(f"--only {unknown}: not runs of {directory}; its runs are: {', '.join(names)}")
    if workers < 1 or (threads is not None and threads < 1):
        raise LadderError(f"workers ({workers}) and threads ({threads}) must be at least 1")
    pending = []
    for run in plan.runs:
        if only and run.name not in only:
            continue
        if run_status(directory, run).done:
            echo(f"{run.name}: done, skipped")
        else:
            pending.append(run)
    if workers > 1:
        if "RANK" in os.environ:
            raise LadderError("--workers > 1 starts its own processes; under torchrun use one worker (the ranks "
                              "share each run)")
        _train_in_processes(directory, pending, workers, threads or max(1, (os.cpu_count() or 1) // workers), echo)
    else:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        for run in pending:
            _train_run(directory, run, echo, progress)
    statuses = [run_status(directory, run) for run in plan.runs]
    if collect and os.environ.get("RANK", "0") == "0":
        write_results(directory, statuses)
    return statuses


def _train_run(directory: Path, run: LadderRun, echo, progress: bool) -> None:
    from hybridlm.train import TrainConfig, train
    from hybridlm.train.checkpoint import list_checkpoints

    config = TrainConfig.from_yaml(directory / run.points[-1].config)
    run_dir = run_directory(directory, run)
    with _run_lock(run_dir):
        _check_same_run(run_dir, config)
        checkpoints = list_checkpoints(run_dir)
        echo(f"{run.name}: N {run.N:,}, {run.steps:,} steps x {run.batch_tokens:,} tokens"
             f"{f', resuming from step {checkpoints[-1][0]:,}' if checkpoints else ''}")
        train(config, run_dir, resume=bool(checkpoints), progress=progress, echo=echo)
    _check_parameter_count(run_dir, run)


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Refuse to train a run that another `ladder run` process is training (two writers would corrupt it).

    Under torchrun the ranks of one job share the run, so no lock is taken there.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if fcntl is None or "RANK" in os.environ:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".ladder.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LadderError(f"{run_dir} is being trained by another `hybridlm ladder run` process; wait for it "
                              "or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train_in_processes(directory: Path, runs: Sequence[LadderRun], workers: int, threads: int, echo) -> None:
    """Train `runs` in up to `workers` child processes at once, largest (6ND) first, so the last to finish is small."""
    import subprocess
    import sys
    import time

    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    queue = sorted(runs, key=lambda run: run.flops, reverse=True)
    import hybridlm

    # The children import this same hybridlm, installed or not.
    source_root = str(Path(hybridlm.__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # Children are reaped with os.wait4, which also gives each one's CPU time: with one thread per worker that is
    # about what the run would take on an idle core, whatever else shares the machine.
    active: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    failed = []
    while queue or active:
        while queue and len(active) < workers:
            run = queue.pop(0)
            log = (logs / f"{run.name}.log").open("a")
            command = [sys.executable, "-m", "hybridlm", "ladder", "run", str(directory), "--only", run.name,
                       "--threads", str(threads), "--no-collect"]
            active[run.name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env),
                                time.perf_counter(), log)
            echo(f"{run.name}: started (N {run.N:,}, {run.steps:,} steps; log {log.name})")
        time.sleep(0.5)
        for name, (process, started, log) in list(active.items()):
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == 0:
                continue
            process.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            del active[name]
            seconds, cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
            if process.returncode == 0:
                echo(f"{name}: finished in {seconds:,.0f} s ({cpu:,.0f} CPU-seconds)")
            else:
                failed.append(name)
                echo(f"{name}: failed with exit code {process.returncode} after {seconds:,.0f} s; see {log.name}")
    if failed:
        raise LadderError(f"runs {', '.join(failed)} failed; their logs are in {logs}. Fix the cause and run "
                          "`hybridlm ladder run` again (finished runs are skipped, interrupted ones resume)")


# ----------------------------------------------------------------------------------------------------------------------
# Estimating a plan's time before running it


@dataclass(frozen=True)
class RunEstimate:
    """Measured cost of one run of a plan: seconds per optimizer step and per evaluation, on this machine.

    step_seconds: median over the timed steps (the first step, which warms up, is left out); eval_seconds: one
    evaluation of eval_sequences held-out sequences. seconds: the whole run (every step, an evaluation before and
    after each decay), without start-up and checkpoint writing.
    """

    run: LadderRun
    step_seconds: float
    eval_seconds: float

    @property
    def seconds(self) -> float:
        return self.run.steps * self.step_seconds + 2 * len(self.run.points) * self.eval_seconds


def estimate_run(directory: str | Path, run: LadderRun, *, steps: int = 4) -> RunEstimate:
    """Time `steps` optimizer steps and one evaluation of a run by training a copy of its config (same model,
    data, batch and optimizer; constant learning rate; no checkpoints but the last) in a temporary directory.

    The timing is the trainer's own per-step wall time, at the torch thread count of this process.
    """
    import statistics
    import tempfile

    from hybridlm.train import TrainConfig, train
    from hybridlm.train.logging import read_metrics

    if steps < 2:
        raise LadderError(f"steps must be at least 2 to time a run (the first step warms up), got {steps}")
    values = TrainConfig.from_yaml(Path(directory) / run.points[-1].config).to_dict()
    values["schedule"] = {"name": "constant", "warmup_steps": 0}
    values["trainer"].update(steps=steps, log_every=1, eval_every=0, checkpoint_every=0, keep_last=1, sample_tokens=0,
                             tensorboard=False, wandb_project=None)
    with tempfile.TemporaryDirectory(prefix="ladder-estimate-") as scratch:
        train(TrainConfig.from_dict(values), scratch, progress=False, echo=lambda *args, **kwargs: None)
        records = read_metrics(scratch)
    by_step = {record["step"]: record for record in records if "tokens_per_s" in record}
    if sorted(by_step) != list(range(1, steps + 1)):
        raise LadderError(f"{run.name}: timing run logged steps {sorted(by_step)}, expected 1..{steps}")
    step_times = [run.batch_tokens / by_step[step]["tokens_per_s"] for step in range(1, steps + 1)]
    step_seconds = statistics.median(step_times[1:])
    # The last step's record is written after its evaluation: its elapsed time minus the previous record's is one
    # step plus one evaluation.
    eval_seconds = by_step[steps]["elapsed_s"] - by_step[steps - 1]["elapsed_s"] - step_times[-1]
    return RunEstimate(run, step_seconds, max(0.0, eval_seconds))


def projected_wall_seconds(estimates: Sequence[RunEstimate], workers: int = 1) -> float:
    """Wall time of training the estimated runs with `workers` processes in the order `run_ladder` uses (largest
    6ND first, each to the first free worker)."""
    if workers < 1:
        raise LadderError(f"workers must be at least 1, got {workers}")
    free_at = [0.0] * workers
    for estimate in sorted(estimates, key=lambda e: e.run.flops, reverse=True):
        index = free_at.index(min(free_at))
        free_at[index] += estimate.seconds
    return max(free_at)


def estimate_ladder(directory: str | Path, *, only: Sequence[str] = (), steps: int = 4,
                    threads: int | None = None, echo: Callable[[str], None] = print) -> list[RunEstimate]:
    """estimate_run for every run of the plan in `directory` (only: just these run names), one after another.

    threads: torch threads while timing; give the per-worker count that `ladder run --workers` will use (1 per
    core), since the runs are timed alone on an otherwise idle machine.
    """
    import torch

    plan = load_plan(directory)
    names = [run.name for run in plan.runs]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise LadderError(f"--only {unknown}: not runs of {directory}; its runs are: {', '.join(names)}")
    if threads is not None:
        if threads < 1:
            raise LadderError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    estimates = []
    for run in plan.runs:
        if only and run.name not in only:
            continue
        estimate = estimate_run(directory, run, steps=steps)
        echo(f"{run.name}: {estimate.step_seconds:.3f} s/step, {estimate.eval_seconds:.2f} s/evaluation, "
             f"{estimate.seconds:,.0f} s in all")
        estimates.append(estimate)
    return estimates


# Trainer settings that do not change what a run computes (or only its float rounding): a run may continue with
# other values of these.
OPERATIONAL_TRAINER_KEYS = ("steps", "log_every", "checkpoint_every", "keep_last", "micro_batch_size", "compile",
                            "activation_checkpointing", "sample_prompt", "sample_tokens", "tensorboard", "wandb_project")


def _check_same_run(run_dir: Path, config) -> None:
    """Refuse to continue a run directory that was trained with a different config than the plan's (other than
    a longer WSD-S schedule whose periods extend the old ones)."""
    import yaml

    from hybridlm.train.trainer import CONFIG_FILE

    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved, planned = yaml.safe_load(saved_path.read_text()), config.to_dict()
    old_ends = saved.get("schedule", {}).get("period_ends", [])
    new_ends = planned["schedule"]["period_ends"]
    comparable = []
    for values in (saved, planned):
        values = json.loads(json.dumps(values))
        values["schedule"].pop("period_ends", None)
        for key in OPERATIONAL_TRAINER_KEYS:
            values["trainer"].pop(key, None)
        comparable.append(values)
    differences = sorted(f"{section}.{key}" for section in comparable[1] for key in comparable[1][section]
                         if comparable[0].get(section, {}).get(key) != comparable[1][section][key])
    shorter = min(len(old_ends), len(new_ends))
    if differences or old_ends[:shorter] != new_ends[:shorter]:
        what = ", ".join(differences) if differences else "schedule.period_ends (not a prefix of the plan's)"
        raise LadderError(f"{run_dir} was trained with another config than the plan's (differs in: {what}); remove "
                          "that run directory to train it again, or plan into a new directory")


def _check_parameter_count(run_dir: Path, run: LadderRun) -> None:
    """The model that was trained must have the N the plan (and results.csv) states."""
    import torch

    from hybridlm.models import HybridConfig, HybridLM
    from hybridlm.train.checkpoint import MODEL_CONFIG

    path = run_dir / MODEL_CONFIG
    if not path.is_file():
        return  # not rank 0's file system view yet, or a run that failed before writing it
    with torch.device("meta"):
        trained = HybridLM(HybridConfig.from_dict(json.loads(path.read_text()))).num_parameters(exclude_embeddings=True)
    if trained != run.N:
        raise LadderError(f"{run_dir}: the trained model has {trained:,} non-embedding parameters, the plan says "
                          f"{run.N:,}; the dataset's tokenizer probably differs from the plan's vocabulary: plan again")


RESULT_COLUMNS = ("arch", "N", "D", "loss", "size", "multiplier", "tokens_per_param", "steps", "batch_tokens", "lr",
                  "beta2", "val_bpb", "pre_decay_loss", "elapsed_s", "run")


def result_rows(statuses: Sequence[RunStatus]) -> list[dict[str, Any]]:
    """One row per finished point: arch,N,D,loss (what `hybridlm fit` reads) and the extras of RESULT_COLUMNS."""
    rows = []
    for status in statuses:
        run = status.run
        for result in status.results:
            if result.loss is None:
                continue
            rows.append({
                "arch": run.arch,
                "N": run.N,
                "D": result.tokens,
                "loss": f"{result.loss:.6f}",
                "size": run.size,
                "multiplier": f"{result.point.multiplier:g}",
                "tokens_per_param": f"{result.tokens / run.N:.2f}",
                "steps": result.point.steps,
                "batch_tokens": run.batch_tokens,
                "lr": f"{run.lr:.6g}",
                "beta2": run.beta2,
                "val_bpb": "" if result.bpb is None else f"{result.bpb:.6f}",
                "pre_decay_loss": "" if result.pre_decay_loss is None else f"{result.pre_decay_loss:.6f}",
                "elapsed_s": "" if result.elapsed_s is None else f"{result.elapsed_s:.1f}",
                "run": f"{RUNS_DIR}/{run.name}",
            })
    return rows


def write_results(directory: str | Path, statuses: Sequence[RunStatus]) -> Path:
    """Write DIRECTORY/results.csv (header only when no point has finished)."""
    path = Path(directory) / RESULTS_FILE
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(result_rows(statuses))
    return path
