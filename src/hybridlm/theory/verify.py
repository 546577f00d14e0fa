"""Run the constructions on random task instances and check that every answer is exact.

For each construction: draw instances from the task's own generator, build the model for that task,
run the ordinary forward (GDN layers through `gated_delta_rule` with impl="auto", the chunked operator
for long inputs; attention through SDPA) and take the argmax of the logits at every supervised
position. The decoding path is checked too, on the first `decode_instances` instances: prefill the
prompt up to the answer position with a `HybridCache` (chunked GDN with states, KV cache) and decode
the answer position with `decode_step` (one recurrent GDN step, attention over the cache). The prefill
costs as much as a forward, hence the separate count.

    results = verify_constructions(n=10_000, m=1_000, instances=2)
    print(format_table(results))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from hybridlm.models import HybridLM
from hybridlm.tasks import BitRecall, Example, Parity, StateBasedRecall, StateTracking, Task
from hybridlm.tasks.state_recall import MAX_BITS, MAX_LINES, POINTER_NAMES
from hybridlm.theory.parity import build_parity_model
from hybridlm.theory.retrieval import build_bit_recall_model
from hybridlm.theory.state_recall import build_state_recall_model
from hybridlm.theory.tracking import build_tracking_model

# Long inputs run a few at a time: activations of the chunked operator grow with batch * tokens.
TOKENS_PER_BATCH = 1 << 17


@dataclass(frozen=True)
class Construction:
    name: str
    claim: str
    make_task: Callable[[int, int, int], Task]  # (n, m, k) -> task with those exact sizes
    build: Callable[..., HybridLM]  # build(task, dtype=...) -> model
    sizes: Callable[[int, int, int], str]


CONSTRUCTIONS: dict[str, Construction] = {
    c.name: c
    for c in (
        Construction(
            "parity", "(a) one GDN layer (beta = 2 reflections) outputs the parity of every prefix",
            lambda n, m, k: Parity(length=(n, n), labels="prefix"), build_parity_model,
            lambda n, m, k: f"length={n}",
        ),
        Construction(
            "tracking", "(b) a GDN layer tracks k pointers through swaps (3 reflections per swap)",
            lambda n, m, k: StateTracking(n=(n, n), m=(m, m), k=k, mode="swap", max_bits=m), build_tracking_model,
            lambda n, m, k: f"n={n} m={m} k={k}",
        ),
        Construction(
            "bit_recall", "(c) an attention layer retrieves bits[i] given i",
            lambda n, m, k: BitRecall(m=(m, m), max_bits=m), build_bit_recall_model,
            lambda n, m, k: f"m={m}",
        ),
        Construction(
            "state_recall", "(d) GDN -> attention solves state-based recall",
            lambda n, m, k: StateBasedRecall(n=(n, n), m=(m, m), k=k, mode="swap", max_bits=m),
            build_state_recall_model, lambda n, m, k: f"n={n} m={m} k={k}",
        ),
    )
}


@dataclass
class VerifyResult:
    """Outcome of one construction on its instances.

    exact: instances answered exactly by the forward.
    decode_exact / decoded: of the first `decoded` instances, those answered exactly by prefill +
        decode_step at the (last) answer position.
    margin: the smallest (target logit - best other logit) / max(|those two|) over all supervised
        positions, a scale-free measure of how far every answer is from flipping.
    """

    name: str
    layers: str
    sizes: str
    tokens: int
    instances: int
    exact: int
    decode_exact: int
    decoded: int
    margin: float
    forward_seconds: float
    decode_seconds: float

    @property
    def passed(self) -> bool:
        return self.exact == self.instances and self.decode_exact == self.decoded


def check_sizes(n: int, m: int, k: int, instances: int) -> None:
    """ValueError naming the bad knob and its valid range."""
    problems = []
    for name, value in (("n", n), ("m", m), ("k", k), ("instances", instances)):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name} must be an integer; got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    k_high = min(len(POINTER_NAMES), 26)
    if not 2 <= k <= k_high:
        problems.append(f"k={k} pointers is out of range: valid k is 2..{k_high}")
    if not 1 <= n <= MAX_LINES:
        problems.append(f"n={n} is out of range: valid n (swap lines, and parity bits) is 1..{MAX_LINES}")
    if not max(k, 2) <= m <= MAX_BITS:
        problems.append(
            f"m={m} is out of range: each of the k={k} pointers needs its own index, so valid m is "
            f"{max(k, 2)}..{MAX_BITS}"
        )
    if instances < 1:
        problems.append(f"instances={instances} is out of range: need at least 1")
    if problems:
        raise ValueError("; ".join(problems))


def verify_constructions(
    n: int, m: int, *, k: int = 5, instances: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
    names: list[str] | None = None, decode_instances: int = 1, progress: Callable[[str], None] | None = None,
) -> list[VerifyResult]:
    """Run every construction (or those in `names`) on `instances` random instances of the given sizes."""
    check_sizes(n, m, k, instances)
    if isinstance(decode_instances, bool) or not isinstance(decode_instances, int) or decode_instances < 0:
        raise ValueError(
            f"decode_instances must be an integer >= 0 (0 skips the decode path); got {decode_instances!r}"
        )
    names = list(CONSTRUCTIONS) if names is None else names
    unknown = [name for name in names if name not in CONSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown constructions {unknown}; valid names: {list(CONSTRUCTIONS)}")
    results = []
    for name in names:
        construction = CONSTRUCTIONS[name]
        if progress is not None:
            progress(f"{name}: {construction.sizes(n, m, k)}, {instances} instances ...")
        task = construction.make_task(n, m, k)
        examples = task.dataset(instances, seed)
        model = construction.build(task, dtype=dtype)
        results.append(run_instances(model, examples, name, construction.sizes(n, m, k),
                                     decode_instances=decode_instances))
    return results


def run_instances(model: HybridLM, examples: list[Example], name: str, sizes: str, *,
                  decode_instances: int = 1) -> VerifyResult:
    """Forward every example (and prefill + decode the first `decode_instances`); count exact answers."""
    exact = decode_exact = 0
    decoded = min(decode_instances, len(examples))
    margin = float("inf")
    forward_seconds = decode_seconds = 0.0
    for batch in _batches(examples):
        ids = torch.tensor([example.input_ids for example in batch])
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(ids).logits
        forward_seconds += time.perf_counter() - start
        for row, example in enumerate(batch):
            positions = example.supervised_positions
            targets = torch.tensor([example.targets[t] for t in positions])
            chosen = logits[row, positions]
            exact += bool((chosen.argmax(-1) == targets).all())
            margin = min(margin, _relative_margin(chosen, targets))
        del logits
    for batch in _batches(examples[:decoded]):
        ids = torch.tensor([example.input_ids for example in batch])
        start = time.perf_counter()
        decode_exact += _decode_matches(model, batch, ids)
        decode_seconds += time.perf_counter() - start
    return VerifyResult(name, model.config.layout, sizes, len(examples[0]), len(examples), exact, decode_exact,
                        decoded, margin, forward_seconds, decode_seconds)


def _batches(examples: list[Example]) -> list[list[Example]]:
    """Groups of equal-length examples of at most TOKENS_PER_BATCH tokens (at least one example)."""
    by_length: dict[int, list[Example]] = {}
    for example in examples:
        by_length.setdefault(len(example), []).append(example)
    batches = []
    for length, group in by_length.items():
        size = max(1, TOKENS_PER_BATCH // length)
        batches += [group[i : i + size] for i in range(0, len(group), size)]
    return batches


def _relative_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """min over positions of (target logit - best other) / max(|target logit|, |best other|)."""
    logits = logits.double()
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    others = logits.scatter(-1, targets[:, None], float("-inf")).max(-1).values
    scale = torch.maximum(target.abs(), others.abs()).clamp(min=1e-300)
    return float(((target - others) / scale).min())


def _decode_matches(model: HybridLM, batch: list[Example], ids: torch.Tensor) -> int:
    """Prefill up to the last supervised position with a cache, decode that position, compare."""
    last = [example.supervised_positions[-1] for example in batch]
    if len(set(last)) != 1:
        raise ValueError("a batch must share its answer position")
    position = last[0]
    cache = model.allocate_cache(len(batch), position + 1)
    with torch.no_grad():
        if position > 0:
            model(ids[:, :position], cache=cache, compute_logits=False)
        logits = model.decode_step(ids[:, position : position + 1], cache)
    targets = torch.tensor([example.targets[position] for example in batch])
    matches = logits.argmax(-1) == targets
    return int(matches.sum())


def format_table(results: list[VerifyResult]) -> str:
    """The results as an aligned text table."""
    header = ("construction", "layers", "sizes", "tokens", "instances", "exact (forward)", "exact (decode)",
              "margin", "forward s", "decode s")
    rows = [header]
    for r in results:
        rows.append((r.name, r.layers, r.sizes, str(r.tokens), str(r.instances), f"{r.exact}/{r.instances}",
                     f"{r.decode_exact}/{r.decoded}", f"{r.margin:.3f}", f"{r.forward_seconds:.1f}",
                     f"{r.decode_seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
