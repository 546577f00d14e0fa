"""Where a training step's GPU time goes: kernel time by category, per preset.

    python benchmarks/train_profile.py [--presets hybrid-1b transformer-1b] [--seq-len 8192]
        [--tokens-per-step 16384] [--steps 2] [--warmup 3] [--compile] [--top 25] [--loss fused|logits]

Same loop as `train_throughput.py` (bf16 autocast over float32 parameters, fused AdamW, random
tokens). After the warmup steps, `--steps` steps run under torch.profiler; the CUDA kernels' time
is summed per category (by kernel name) and divided by the number of profiled steps. The
categories are heuristics over kernel names; "other" holds what none matched, and `--top` lists
the biggest kernels by name so that the table can be checked.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_throughput import build_ours  # noqa: E402

# First match wins, in this order.
CATEGORIES = [
    ("gdn", r"^_(state_fwd|state_bwd|grad_local|grad_state|prepare|output|qk_norm|chunk|fwd_|bwd_)"),
    ("conv", r"_conv_"),
    ("gated norm", r"_gated_rms_norm"),
    ("attention", r"flash|fmha|flex|attention|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_|sm80_|splitK|gemv"),
    ("optimizer", r"adam|multi_tensor"),
    ("loss/softmax", r"softmax|cross_entropy|nll_loss|log_softmax|_lm_loss_"),
    ("copy/cat", r"copy|cat|CatArray|elementwise_kernel_manual_unroll"),
    ("triton (inductor)", r"^triton_"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|unrolled"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def profile(preset: str, args) -> tuple[dict, list, float]:
    device = torch.device("cuda")
    batch = args.tokens_per_step // args.seq_len
    model, loss_fn, _, vocab = build_ours(preset, args.seq_len, device, False, args.compile, loss=args.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, args.seq_len + 1), device=device, generator=gen)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / args.steps
    by_name: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name] += event.time_range.elapsed_us() / 1e3 / args.steps  # ms per step
    by_cat: dict[str, float] = collections.defaultdict(float)
    for name, ms in by_name.items():
        by_cat[category(name)] += ms
    top = sorted(by_name.items(), key=lambda item: -item[1])[: args.top]
    del model, optimizer
    torch.cuda.empty_cache()
    return by_cat, top, wall_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["hybrid-1b", "transformer-1b"])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--loss", choices=["fused", "logits"], default="fused", help="as in train_throughput.py")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    results = {}
    for preset in args.presets:
        by_cat, top, wall = profile(preset, args)
        results[preset] = (by_cat, wall)
        print(f"\n## {preset}: {wall:.1f} ms per step (CUDA events), top kernels (ms per step)")
        for name, ms in top:
            print(f"  {ms:8.2f}  [{category(name)}]  {name[:110]}")
    labels = [label for label, _ in CATEGORIES] + ["other"]
    print("\n| category | " + " | ".join(args.presets) + " |")
    print("|---|" + "---|" * len(args.presets))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{results[p][0].get(label, 0.0):.1f}" for p in args.presets) + " |")
    print("| kernels, total | " + " | ".join(f"{sum(results[p][0].values()):.1f}" for p in args.presets) + " |")
    print("| step (wall) | " + " | ".join(f"{results[p][1]:.1f}" for p in args.presets) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
