"""The expressivity experiments: train small matched-size models of each architecture on each task.

    from hybridlm.tasks.experiments import get_grid, run_grid
    records = run_grid(get_grid("cpu"), "runs/expressivity")     # results.json, tables, plots

A grid is a list of task settings (a task, its fixed knobs, one knob varied over difficulty levels and the
knobs a longer-than-training test set grows), a list of architectures, one model size, a few seeds and one
training recipe. Each (task, difficulty, architecture, seed) is one run: a fresh model trained on a fresh
stream of examples, then scored by exact-match accuracy on an in-distribution set and on a longer set.

Architectures (`ARCHITECTURES`) share depth, d_model and heads; their parameter counts are matched by the
MLP width (`matched_configs`), so the comparison isolates the token mixer: full attention, GDN with beta in
(0, 1), GDN with beta in (0, 2), and the 3:1 and 1:1 hybrids. Positions follow the paper's two models: the
transformer uses RoPE (as Olmo 3), the hybrids' attention layers none (NoPE, as Olmo Hybrid: the GDN layers
carry position). A NoPE transformer could not even learn to look up a pointer's initial value in our
budget, so it would not be a fair in-distribution baseline; `transformer-nope` (gpu grid) measures it anyway,
since NoPE length-generalizes differently from RoPE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from hybridlm.models import HybridConfig, HybridLM
from hybridlm.tasks.base import IGNORE_INDEX, Example, Task
from hybridlm.tasks.batching import collate, exact_matches
from hybridlm.tasks.registry import task_class
from hybridlm.tasks.splits import longer_knobs

RESULTS_FILE = "results.json"

# Architectures ------------------------------------------------------------------------------------------
# name: (description, HybridConfig fields). Hybrids use GDN with negative eigenvalues, as Olmo Hybrid.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "transformer": ("full causal attention in every layer, RoPE (theta 10,000)",
                    {"layer_pattern": "A", "rope_theta": 10000.0}),
    "gdn-noneg": ("Gated DeltaNet in every layer, beta in (0, 1)", {"layer_pattern": "G", "gdn_neg_eigval": False}),
    "gdn": ("Gated DeltaNet in every layer, beta in (0, 2) (negative eigenvalues)",
            {"layer_pattern": "G", "gdn_neg_eigval": True}),
    "hybrid-3to1": ("3 GDN (beta in (0, 2)) : 1 NoPE attention, GGGA", {"layer_pattern": "GGGA", "gdn_neg_eigval": True}),
    "hybrid-1to1": ("1 GDN (beta in (0, 2)) : 1 NoPE attention, GA", {"layer_pattern": "GA", "gdn_neg_eigval": True}),
    "transformer-nope": ("full causal attention in every layer, no positional encoding", {"layer_pattern": "A"}),
}
REFERENCE_ARCHITECTURE = "transformer"  # the parameter budget every architecture is matched to
PARAMETER_TOLERANCE = 0.10


@dataclass(frozen=True)
class ModelSize:
    """Shape shared by every architecture. The transformer's MLP is `mlp_ratio * d_model` wide; the
    others' MLP width is chosen to match its non-embedding parameter count (see `matched_configs`).
    gdn_heads: GDN key/value heads (key head dim 0.75 d_model / gdn_heads, value head dim twice that)."""

    d_model: int
    n_layers: int
    n_heads: int
    gdn_heads: int
    mlp_ratio: int = 4


def body_parameters(config: HybridConfig) -> int:
    """Parameters outside the input embedding and the LM head (they depend on the task's vocabulary only)."""
    with torch.device("meta"):
        model = HybridLM(config)
    vocab_params = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return model.num_parameters() - vocab_params


def architecture_config(arch: str, size: ModelSize, vocab_size: int, mlp_hidden: int) -> HybridConfig:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    fields = dict(ARCHITECTURES[arch][1])
    fields.setdefault("rope_theta", None)
    return HybridConfig(
        vocab_size=vocab_size,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        mlp_hidden=mlp_hidden,
        gdn_key_heads=size.gdn_heads,
        gdn_value_heads=size.gdn_heads,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        max_seq_len=1 << 16,
        **fields,
    )


def matched_configs(
    archs: Sequence[str], size: ModelSize, vocab_size: int, tolerance: float = PARAMETER_TOLERANCE
) -> dict[str, HybridConfig]:
    """One config per architecture whose non-embedding parameter count is within `tolerance` of the
    transformer's at `size` (MLP width a multiple of 8 chosen to get closest; ValueError if impossible)."""
    reference = size.mlp_ratio * size.d_model
    target = body_parameters(architecture_config(REFERENCE_ARCHITECTURE, size, vocab_size, reference))
    configs = {}
    for arch in archs:
        at_reference = body_parameters(architecture_config(arch, size, vocab_size, reference))
        # Body parameters are affine in the MLP width: n_layers MLPs of 3 d_model * mlp_hidden each.
        per_unit = 3 * size.d_model * size.n_layers
        mlp_hidden = max(8, 8 * round((reference + (target - at_reference) / per_unit) / 8))
        config = architecture_config(arch, size, vocab_size, mlp_hidden)
        count = body_parameters(config)
        if abs(count - target) > tolerance * target:
            raise ValueError(
                f"{arch} cannot be matched to the {REFERENCE_ARCHITECTURE}'s {target:,} non-embedding parameters "
                f"at d_model={size.d_model} (closest: {count:,} with mlp_hidden={mlp_hidden}); use a larger d_model "
                f"or mlp_ratio"
            )
        configs[arch] = config
    return configs


# Tasks and grids ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSetting:
    """One task of a grid: `task` with `knobs`, the knob `difficulty` set to each of `levels` in turn.

    name: the label in tables and `--tasks` (e.g. "word_problem_S5"); defaults to the task name.
    lengthen: the length knobs the longer-than-training test set grows (`longer_knobs`, factor 2); empty
        for no such test (e.g. bit recall, whose longer lists would ask for index tokens never trained on).
    """

    task: str
    knobs: dict[str, Any]
    difficulty: str
    levels: tuple[Any, ...]
    lengthen: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.task)
        cls = task_class(self.task)
        cls.knob(self.difficulty)
        for name in self.lengthen:
            if not cls.knob(name).length:
                raise ValueError(f"{self.task}: {name!r} is not a length knob, so it cannot be lengthened")

    def train_knobs(self, level: Any) -> dict[str, Any]:
        return {**self.knobs, self.difficulty: level}

    def level_label(self, level: Any) -> str:
        """e.g. "m=16:32" (the knob's command-line form)."""
        knob = task_class(self.task).knob(self.difficulty)
        return f"{self.difficulty}={knob.format(knob.normalize(level))}"

    def task_instance(self, level: Any) -> Task:
        return task_class(self.task)(**self.train_knobs(level))

    def test_knobs(self, level: Any) -> dict[str, Any] | None:
        if not self.lengthen:
            return None
        return longer_knobs(self.task_instance(level), lengthen=self.lengthen)


@dataclass(frozen=True)
class Recipe:
    """The training recipe of every run of a grid: AdamW, linear warmup then cosine to 10% of the peak."""

    steps: int
    batch_size: int
    lr: float
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_examples: int = 256
    eval_batch_size: int = 256


@dataclass(frozen=True)
class Grid:
    name: str
    tasks: tuple[TaskSetting, ...]
    archs: tuple[str, ...]
    size: ModelSize
    recipe: Recipe
    seeds: tuple[int, ...]
    workers: int = 1  # parallel runs (processes); each CPU worker uses `threads` threads
    threads: int = 1
    description: str = ""

    def replace(self, **changes: Any) -> "Grid":
        return dataclasses.replace(self, **changes)

    def select(
        self,
        tasks: Sequence[str] | None = None,
        archs: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
    ) -> "Grid":
        """The grid restricted to some tasks / architectures, with other seeds or a step count."""
        grid = self
        if tasks:
            known = {setting.name: setting for setting in self.tasks}
            unknown = [name for name in tasks if name not in known]
            if unknown:
                raise ValueError(f"grid {self.name!r} has no task {', '.join(unknown)}; its tasks: {', '.join(known)}")
            grid = grid.replace(tasks=tuple(known[name] for name in tasks))
        if archs:
            unknown = [name for name in archs if name not in ARCHITECTURES]
            if unknown:
                raise ValueError(f"unknown architecture {', '.join(unknown)}; valid: {', '.join(ARCHITECTURES)}")
            grid = grid.replace(archs=tuple(archs))
        if seeds:
            if any(seed < 0 for seed in seeds):
                raise ValueError(f"seeds must be non-negative integers; got {list(seeds)}")
            grid = grid.replace(seeds=tuple(seeds))
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be a positive number of optimizer steps; got {steps}")
            grid = grid.replace(recipe=dataclasses.replace(grid.recipe, steps=steps))
        return grid


MAIN_ARCHS = ("transformer", "gdn-noneg", "gdn", "hybrid-3to1", "hybrid-1to1")


def _cpu_grid() -> Grid:
    # Sized to what 500 steps of a d_model-32 model can learn: 3 pointers, short programs, small lists.
    tasks = (
        TaskSetting("parity", {}, "length", ((2, 8),), lengthen=("length",)),
        TaskSetting("mqar", {"seq_len": 32, "vocab_size": 64}, "num_pairs", (2, 8), lengthen=("seq_len",)),
        TaskSetting("state_tracking", {"m": (3, 3), "k": 3, "max_bits": 3}, "n", ((0, 4),), lengthen=("n",)),
        TaskSetting("bit_recall", {"max_bits": 16}, "m", ((4, 8), (8, 16))),
        TaskSetting("state_recall", {"k": 3, "n": (0, 4), "max_bits": 8}, "m", ((4, 8),), lengthen=("n",)),
    )
    return Grid(
        name="cpu",
        tasks=tasks,
        archs=MAIN_ARCHS,
        size=ModelSize(d_model=32, n_layers=4, n_heads=2, gdn_heads=1),
        recipe=Recipe(steps=500, batch_size=32, lr=3e-3),
        seeds=(0, 1),
        workers=2,
        threads=1,
        description="CPU grid: 4 layers, d_model 32, two single-threaded worker processes",
    )


def _gpu_grid() -> Grid:
    tasks = (
        TaskSetting("parity", {}, "length", ((2, 16), (2, 40)), lengthen=("length",)),
        TaskSetting("word_problem", {"group": "S5", "labels": "prefix"}, "length", ((2, 8), (2, 16)),
                    lengthen=("length",), name="word_problem_S5"),
        TaskSetting("word_problem", {"group": "A4xZ5", "labels": "prefix"}, "length", ((2, 8), (2, 16)),
                    lengthen=("length",), name="word_problem_A4xZ5"),
        TaskSetting("mqar", {"seq_len": 128, "vocab_size": 256}, "num_pairs", (4, 8, 16, 32), lengthen=("seq_len",)),
        TaskSetting("state_tracking", {"m": (8, 16), "k": 5, "max_bits": 16}, "n", ((0, 8), (0, 16)),
                    lengthen=("n",)),
        TaskSetting("bit_recall", {"max_bits": 128}, "m", ((8, 16), (16, 32), (32, 64), (64, 128))),
        TaskSetting("state_recall", {"k": 5, "n": (0, 8), "max_bits": 64}, "m", ((8, 16), (16, 32), (32, 64)),
                    lengthen=("n",)),
    )
    return Grid(
        name="gpu",
        tasks=tasks,
        archs=MAIN_ARCHS + ("transformer-nope",),
        size=ModelSize(d_model=128, n_layers=4, n_heads=4, gdn_heads=2),
        recipe=Recipe(steps=3000, batch_size=128, lr=1e-3, eval_examples=1024),
        seeds=(0, 1, 2),
        workers=8,
        threads=1,
        description="GPU grid: 4 layers, d_model 128, eight worker processes sharing one GPU",
    )


GRIDS: dict[str, Callable[[], Grid]] = {"cpu": _cpu_grid, "gpu": _gpu_grid}


def get_grid(name: str) -> Grid:
    try:
        return GRIDS[name]()
    except KeyError:
        raise ValueError(f"unknown grid {name!r}; valid grids: {', '.join(GRIDS)}") from None


# Runs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; `key` names it in results.json (and decides what resume skips)."""

    setting: TaskSetting
    level: Any
    arch: str
    seed: int
    size: ModelSize
    recipe: Recipe

    @property
    def difficulty(self) -> str:
        return self.setting.level_label(self.level)

    @property
    def key(self) -> str:
        size, recipe = self.size, self.recipe
        return (f"{self.setting.name}|{self.difficulty}|{self.arch}|seed={self.seed}|d={size.d_model}x{size.n_layers}"
                f"|steps={recipe.steps}|batch={recipe.batch_size}|lr={recipe.lr:g}")


def plan_runs(grid: Grid) -> list[RunSpec]:
    """Every run of the grid, task by task, difficulty by difficulty, seed by seed, architecture by architecture."""
    return [
        RunSpec(setting, level, arch, seed, grid.size, grid.recipe)
        for setting in grid.tasks
        for level in setting.levels
        for seed in grid.seeds
        for arch in grid.archs
    ]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def _autocast(device: torch.device):
    """bfloat16 autocast on GPU; plain float32 on CPU (bf16 matmuls are slow there and tiny models gain nothing)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup to the peak over the first warmup_fraction of the steps, then cosine to 10% of it."""
    from hybridlm.train.config import ScheduleSection
    from hybridlm.train.optim import lr_at as schedule_lr

    warmup = max(1, round(recipe.warmup_fraction * recipe.steps))
    return schedule_lr(step, recipe.lr, recipe.steps, ScheduleSection("cosine", warmup, 0.1))


@torch.no_grad()
def evaluate(model: HybridLM, examples: Sequence[Example], device: torch.device, batch_size: int) -> dict[str, float]:
    """Exact-match accuracy (every supervised position right) and per-position accuracy of `examples`.

    Examples are scored in batches of similar length (sorted), right-padded, without an attention mask:
    the model is causal and the padding comes after every real token."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    exact, right, total = 0, 0, 0
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = collate(chunk).to(device)
        with _autocast(device):
            predictions = model(batch.input_ids).logits.argmax(-1)
        exact += sum(exact_matches(chunk, predictions.cpu()))
        supervised = batch.targets != IGNORE_INDEX
        right += int((predictions == batch.targets)[supervised].sum())
        total += int(supervised.sum())
    model.train()
    return {"accuracy": exact / len(examples), "position_accuracy": right / max(total, 1)}


def train_run(spec: RunSpec, device: str | torch.device = "auto", log: Callable[[str], None] | None = None) -> dict:
    """Train one fresh model on a fresh example stream and score it; returns the run's record.

    Data: training batches come from the task's seed stream 0, the in-distribution test set from stream 2
    and the longer test set from stream 1 (as `length_split`), so no two of them share a random draw.
    """
    device = pick_device(device) if isinstance(device, str) else device
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    recipe, setting = spec.recipe, spec.setting
    train_task = setting.task_instance(spec.level)
    test_knobs = setting.test_knobs(spec.level)
    test_task = None if test_knobs is None else task_class(setting.task)(**test_knobs)
    if test_task is not None and test_task.vocab != train_task.vocab:
        raise ValueError(f"{setting.name}: the longer test set needs a larger vocabulary than training; "
                         f"raise the vocabulary knob (e.g. max_bits) in the task setting")

    config = matched_configs([spec.arch], spec.size, train_task.vocab_size)[spec.arch]
    torch.manual_seed(spec.seed)
    model = HybridLM(config).to(device)
    from hybridlm.train.optim import parameter_groups

    optimizer = torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98))
    stream = train_task.rng(spec.seed, 0)
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = collate(train_task.dataset(recipe.batch_size, stream)).to(device)
        with _autocast(device):
            logits = model(batch.input_ids).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(loss.detach())  # read back once at the end: no host sync per step on a GPU
        if log is not None and (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"{spec.key}: step {step + 1}/{recipe.steps} loss {loss.item():.4f}")
    losses = torch.stack(losses).tolist()

    in_distribution = evaluate(model, train_task.dataset(recipe.eval_examples, train_task.rng(spec.seed, 2)),
                               device, recipe.eval_batch_size)
    longer = None
    if test_task is not None:
        longer = evaluate(model, test_task.dataset(recipe.eval_examples, train_task.rng(spec.seed, 1)), device,
                          recipe.eval_batch_size)
    tail = losses[-max(1, len(losses) // 10):]
    curve_every = max(1, recipe.steps // 20)
    return {
        "key": spec.key,
        "task": setting.name,
        "task_name": setting.task,
        "difficulty": spec.difficulty,
        "level_index": setting.levels.index(spec.level),
        "train_knobs": _jsonable(train_task.knobs),
        "test_knobs": None if test_task is None else _jsonable(test_task.knobs),
        "arch": spec.arch,
        "layout": config.layout,
        "params_non_embedding": body_parameters(config),
        "params_total": model.num_parameters(),
        "mlp_hidden": config.mlp_hidden,
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "seed": spec.seed,
        "steps": recipe.steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "train_loss": sum(tail) / len(tail),
        "loss_curve": [[step + 1, losses[step]] for step in range(curve_every - 1, len(losses), curve_every)],
        "id_accuracy": in_distribution["accuracy"],
        "id_position_accuracy": in_distribution["position_accuracy"],
        "ood_accuracy": None if longer is None else longer["accuracy"],
        "ood_position_accuracy": None if longer is None else longer["position_accuracy"],
        "device": str(device),
        "wall_seconds": time.perf_counter() - wall_start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def _jsonable(knobs: dict[str, Any]) -> dict[str, Any]:
    return {name: list(value) if isinstance(value, tuple) else value for name, value in knobs.items()}


# The grid -----------------------------------------------------------------------------------------------
def load_results(out_dir: str | Path) -> dict[str, Any]:
    """results.json of `out_dir` ({"runs": [...], ...}), or an empty one."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return {"runs": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); move it away to start the grid afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} does not hold a results object with a 'runs' list; move it away to start afresh")
    return data


def save_results(out_dir: str | Path, data: dict[str, Any]) -> None:
    """Write results.json atomically (a crash mid-write leaves the previous file)."""
    path = Path(out_dir) / RESULTS_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(spec: RunSpec, device: str) -> dict:
    return train_run(spec, device)


def run_grid(
    grid: Grid,
    out_dir: str | Path,
    *,
    device: str = "auto",
    workers: int | None = None,
    log: Callable[[str], None] = print,
    report: bool = True,
) -> list[dict]:
    """Run every run of `grid` not already in `out_dir`/results.json, then write tables and plots.

    Finished runs are saved as they complete, so an interrupted grid resumes where it stopped. Returns
    the records of the grid's runs (old and new), in plan order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_results(out_dir)
    done = {record["key"]: record for record in data["runs"]}
    plan = plan_runs(grid)
    todo = [spec for spec in plan if spec.key not in done]
    workers = grid.workers if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    resolved = pick_device(device)
    log(f"grid {grid.name}: {len(plan)} runs, {len(plan) - len(todo)} already in {out_dir / RESULTS_FILE}, "
        f"{len(todo)} to run on {resolved} with {min(workers, max(len(todo), 1))} worker(s)")

    start_wall, start_usage = time.perf_counter(), _cpu_usage()

    def finish(record: dict) -> None:
        data["runs"].append(record)
        done[record["key"]] = record
        save_results(out_dir, data)
        ood = "-" if record["ood_accuracy"] is None else f"{record['ood_accuracy']:.3f}"
        log(f"[{len(done) - (len(plan) - len(todo)) }/{len(todo)}] {record['key']}: loss {record['train_loss']:.4f} "
            f"id {record['id_accuracy']:.3f} ood {ood} ({record['wall_seconds']:.1f} s wall, "
            f"{record['cpu_seconds']:.1f} s cpu)")

    if workers == 1 or len(todo) <= 1:
        previous_threads = torch.get_num_threads()
        if resolved.type == "cpu":
            torch.set_num_threads(grid.threads)
        try:
            for spec in todo:
                finish(train_run(spec, resolved))
        finally:
            torch.set_num_threads(previous_threads)
    elif todo:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # CUDA and a threaded torch do not survive fork
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                 initargs=(grid.threads,)) as pool:
            futures = [pool.submit(_run_in_worker, spec, str(resolved)) for spec in todo]
            for future in as_completed(futures):
                finish(future.result())

    usage = _cpu_usage()
    session = {
        "grid": grid.name,
        "runs_trained": len(todo),
        "workers": workers,
        "device": str(resolved),
        "wall_seconds": time.perf_counter() - start_wall,
        "cpu_seconds": usage - start_usage,
        "cpu_seconds_of_runs": sum(done[spec.key]["cpu_seconds"] for spec in todo),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    data.setdefault("sessions", []).append(session)
    save_results(out_dir, data)
    log(f"grid {grid.name}: trained {len(todo)} runs in {session['wall_seconds']:.1f} s wall, "
        f"{session['cpu_seconds']:.1f} s cpu (this process and its workers)")
    records = [done[spec.key] for spec in plan]
    if report:
        from hybridlm.tasks.experiment_report import write_report

        for path in write_report(grid, records, out_dir):
            log(f"wrote {path}")
    return records


def _cpu_usage() -> float:
    """User + system CPU seconds of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total
