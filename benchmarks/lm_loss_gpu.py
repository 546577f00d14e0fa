"""The fused LM-head loss (`hybridlm.ops.lm_loss`) against float32 cross-entropy over logits, on a GPU.

    python benchmarks/lm_loss_gpu.py [--tokens 16384] [--d-model 2048] [--vocab 100352] [--reps 10]

Both under bf16 autocast with float32 hidden states and LM-head weight, as in training: the fused
op (the model's loss with labels) and `language_model_loss_sums(F.linear(hidden, weight), labels)`
(the loss over materialised logits). Checks that their sums and gradients agree, then prints forward
+ backward time (CUDA events, median of --reps after 3 warm-ups) and peak memory above the inputs.
The three matmuls alone (logits, d_hidden, d_weight in bf16) are timed too, as the floor of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from hybridlm.ops.lm_loss import fused_lm_loss_sums
from hybridlm.train.loss import language_model_loss_sums


def _time(fn, reps: int) -> tuple[float, float]:
    """(median ms, peak GB allocated above what was allocated before) of fn()."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=100352)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device="cuda", generator=gen).requires_grad_(True)
    weight = torch.randn(args.vocab, args.d_model, device="cuda", generator=gen) * args.d_model**-0.5
    weight.requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=gen)
    labels[::17] = -100

    def fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cross_entropy, z_loss = fused_lm_loss_sums(hidden, weight, labels)
        return cross_entropy, z_loss, *torch.autograd.grad(cross_entropy + 1e-4 * z_loss, (hidden, weight))

    def unfused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sums = language_model_loss_sums(F.linear(hidden, weight), labels)
        loss = sums.cross_entropy + 1e-4 * sums.z_loss
        return sums.cross_entropy, sums.z_loss, *torch.autograd.grad(loss, (hidden, weight))

    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()

    def matmuls():
        logits = h16 @ w16.T
        return logits @ w16, logits.T @ h16

    print("relative difference, fused vs unfused:")
    for name, a, b in zip(["cross-entropy sum", "z-loss sum", "d_hidden", "d_weight"], fused(), unfused()):
        print(f"  {name}: {((a.float() - b.float()).norm() / b.float().norm()).item():.2e}")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, command: {' '.join(sys.argv)}")
    print(f"tokens {args.tokens}, d_model {args.d_model}, vocab {args.vocab}\n")
    print("| loss | fwd+bwd ms | peak GB above inputs |\n|---|---|---|")
    for label, fn in [("fused (hybridlm.ops.lm_loss)", fused), ("float32 cross-entropy over logits", unfused),
                      ("the three bf16 matmuls alone", matmuls)]:
        ms, gb = _time(fn, args.reps)
        print(f"| {label} | {ms:.2f} | {gb:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
