"""How long a grid will take on a GPU, from what one training step measures on this machine's CPU.

For every (task, difficulty, architecture) of a grid, one training step on a probe batch is run on the CPU
under `torch.utils.flop_counter.FlopCounterMode` (FLOPs of matmuls and attention, forward and backward)
and an operator counter (every aten call; on a GPU, roughly one kernel launch each). The example generator's
time per batch is measured too: it runs in Python on the host whatever the device. Then, per step,

    seconds = data_seconds + max(flops / EFFECTIVE_FLOPS, operators * SECONDS_PER_OPERATOR)

i.e. a small model on a big GPU is either compute bound or bound by launching its kernels, whichever is
slower. The constants are assumptions, not measurements (this module never touches a GPU):
EFFECTIVE_FLOPS = 100 TFLOP/s is about 10% of an H200's dense bf16 peak (989 TFLOP/s), what a d_model-128
model's small matmuls can hope for; SECONDS_PER_OPERATOR = 10 us is PyTorch's eager dispatch cost per op.
The CPU counts every operator of the GDN chunk form, whereas the GPU runs fused Triton kernels, so the
launch-bound estimate is pessimistic for GDN layers. Runs of a grid execute `workers` at a time; while each
run is launch bound they overlap almost perfectly, so the grid's time is the serial sum divided by workers.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hybridlm.models import HybridLM
from hybridlm.tasks.base import IGNORE_INDEX
from hybridlm.tasks.batching import collate
from hybridlm.tasks.experiments import Grid, RunSpec, body_parameters, matched_configs, plan_runs

EFFECTIVE_FLOPS = 100e12
SECONDS_PER_OPERATOR = 10e-6
PROBE_EXAMPLES = 16  # FLOPs are linear in the batch; the probe is scaled up to the grid's batch size


class _OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class StepCost:
    """One training step of a run at the grid's batch size: FLOPs, aten operators, data seconds."""

    flops: float
    operators: int
    data_seconds: float

    def gpu_seconds(self) -> float:
        return self.data_seconds + max(self.flops / EFFECTIVE_FLOPS, self.operators * SECONDS_PER_OPERATOR)


def measure_step(spec: RunSpec) -> StepCost:
    """FLOPs and operators of one forward + backward on CPU (probe batch scaled to the batch size) and the
    time to generate one full batch of examples."""
    task = spec.setting.task_instance(spec.level)
    rng = task.rng(spec.seed, 0)
    start = time.perf_counter()
    examples = task.dataset(spec.recipe.batch_size, rng)
    data_seconds = time.perf_counter() - start
    config = matched_configs([spec.arch], spec.size, task.vocab_size)[spec.arch]
    torch.manual_seed(0)
    model = HybridLM(config)
    batch = collate(examples[:PROBE_EXAMPLES], pad_to=max(len(example) for example in examples))
    flop_counter = FlopCounterMode(display=False)
    operators = _OperatorCounter()
    with flop_counter, operators:
        logits = model(batch.input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
    scale = spec.recipe.batch_size / len(batch.input_ids)
    # The optimizer adds a few operators per parameter tensor (fused AdamW on GPU: a handful in all).
    return StepCost(flop_counter.get_total_flops() * scale, operators.count, data_seconds)


def estimate_grid(grid: Grid) -> dict:
    """Per (task, difficulty, architecture): the measured step cost; totals in FLOPs and estimated seconds."""
    runs = plan_runs(grid)
    seeds = len(grid.seeds)
    costs: dict[tuple[str, str, str], StepCost] = {}
    for spec in runs:
        cell = (spec.setting.name, spec.difficulty, spec.arch)
        if cell not in costs:
            costs[cell] = measure_step(spec)
    steps = grid.recipe.steps
    serial = sum(cost.gpu_seconds() for cost in costs.values()) * steps * seeds
    total_flops = sum(cost.flops for cost in costs.values()) * steps * seeds
    return {
        "runs": len(runs),
        "costs": costs,
        "total_flops": total_flops,
        "serial_seconds": serial,
        "grid_seconds": serial / grid.workers,
    }


def print_estimate(grid: Grid) -> None:
    """The plan of `grid` with parameter counts and the GPU time estimate (see the module docstring)."""
    estimate = estimate_grid(grid)
    print(f"grid {grid.name}: {estimate['runs']} runs = {len(grid.tasks)} task settings x their difficulties x "
          f"{len(grid.archs)} architectures x {len(grid.seeds)} seeds; {grid.recipe.steps} steps of "
          f"{grid.recipe.batch_size} examples each")
    print(f"model: {grid.size}")
    print(f"{'task':20s} {'difficulty':16s} {'architecture':16s} {'GFLOP/step':>11s} {'ops/step':>9s} "
          f"{'data ms':>8s} {'est. s/run':>10s}")
    for (task, difficulty, arch), cost in estimate["costs"].items():
        print(f"{task:20s} {difficulty:16s} {arch:16s} {cost.flops / 1e9:11.2f} {cost.operators:9d} "
              f"{cost.data_seconds * 1e3:8.1f} {cost.gpu_seconds() * grid.recipe.steps:10.1f}")
    configs = matched_configs(grid.archs, grid.size, vocab_size=64)
    print("non-embedding parameters: " + ", ".join(f"{arch} {body_parameters(config):,} (MLP {config.mlp_hidden})"
                                                  for arch, config in configs.items()))
    print(f"total training FLOPs: {estimate['total_flops']:.3g}")
    print(f"estimated H200 time: {estimate['serial_seconds'] / 60:.1f} min serial, "
          f"{estimate['grid_seconds'] / 60:.1f} min with {grid.workers} concurrent workers "
          f"(assumes {EFFECTIVE_FLOPS / 1e12:.0f} TFLOP/s effective and {SECONDS_PER_OPERATOR * 1e6:.0f} us per operator; "
          f"evaluation excluded)")
