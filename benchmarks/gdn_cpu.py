"""Forward + backward time of the gated delta rule on CPU: hybridlm's chunk and recurrent
implementations next to transformers' PyTorch fallback (`torch_chunk_gated_delta_rule`).

    python benchmarks/gdn_cpu.py [--repeats 9] [--warmup 2] [--threads N] [--recurrent-repeats 2]

float32, q/k L2-normalised inside every implementation, beta in (0, 2), loss = sum(o * w).
Each timing is the median over repeats after warmup; the chunked implementations take turns within
each repeat so that they see the same machine load. The token loop (autograd through T steps) is
slow and steady, so it gets fewer runs. Prints two Markdown tables: forward + backward, and the
forward alone (timed inside the same runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hybridlm.ops.gated_delta_rule import gated_delta_rule

SHAPES = [(1, 2048, 4, 64, 128), (4, 512, 4, 32, 64)]  # (B, T, H, K, V)


def make_inputs(
    batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int
) -> dict[str, torch.Tensor]:
    """Inputs as the GDN layer produces them: gates from the reference parameterisation."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "q": randn(batch, seq_len, heads, key_dim),
        "k": randn(batch, seq_len, heads, key_dim),
        "v": randn(batch, seq_len, heads, value_dim),
        # g = -exp(A_log) softplus(a + dt_bias), A in (0, 16): decays from mild to strong.
        "g": -torch.rand(heads, generator=generator).mul(16) * F.softplus(randn(batch, seq_len, heads) - 4.0),
        "beta": 2.0 * torch.sigmoid(randn(batch, seq_len, heads)),
    }


def transformers_chunk(q, k, v, g, beta):
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import torch_chunk_gated_delta_rule
    from transformers.utils import logging

    logging.set_verbosity_error()  # its "falling back to PyTorch" notice is the point here
    return torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)[0]


def hybridlm(impl: str):
    def run(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, impl=impl)[0]

    return run


def time_ms(fn, inputs: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of one run."""
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    start = time.perf_counter()
    out = fn(**leaves)
    forward = time.perf_counter()
    (out * weight).sum().backward()
    end = time.perf_counter()
    return (forward - start) * 1e3, (end - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--recurrent-repeats", type=int, default=2, help="timed runs of the token loop; 0 skips it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    chunked = {"transformers fallback": transformers_chunk, "hybridlm chunk": hybridlm("chunk")}
    columns = [*chunked, "hybridlm recurrent"] if args.recurrent_repeats else list(chunked)
    rows = []
    for shape in SHAPES:
        inputs = make_inputs(*shape)
        weight = torch.randn(*inputs["v"].shape, generator=torch.Generator().manual_seed(1))
        times = {name: [] for name in columns}
        for repeat in range(args.warmup + args.repeats):
            for name, fn in chunked.items():
                elapsed = time_ms(fn, inputs, weight)
                if repeat >= args.warmup:
                    times[name].append(elapsed)
        if args.recurrent_repeats:
            time_ms(hybridlm("recurrent"), inputs, weight)  # warmup
            for _ in range(args.recurrent_repeats):
                times["hybridlm recurrent"].append(time_ms(hybridlm("recurrent"), inputs, weight))
        forward = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
        total = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
        rows.append((shape, forward, total))

    print(f"torch {torch.__version__}, {args.threads} threads, float32, median ms")
    for title, index in (("forward + backward", 2), ("forward only", 1)):
        print(f"\n{title}\n")
        print("| B, T, H, K, V | " + " | ".join(columns) + " | chunk speed-up vs fallback |")
        print("|---" * (len(columns) + 2) + "|")
        for row in rows:
            shape, medians = row[0], row[index]
            speedup = medians["transformers fallback"] / medians["hybridlm chunk"]
            cells = " | ".join(f"{medians[name]:.1f}" for name in columns)
            print(f"| {', '.join(map(str, shape))} | {cells} | {speedup:.1f}x |")


if __name__ == "__main__":
    main()
