"""The Triton short conv (+ SiLU) on a GPU: checks against float64 and kernel times per block size.

    python benchmarks/conv_gpu.py [--batch 2] [--seq-len 8192] [--channels 6144] [--width 4]
        [--reps 20]

Checks the forward and both gradients against the PyTorch reference in float64 (float32 inputs,
with and without packed documents), then times forward and backward at bf16 for the default block
sizes and a few others (module globals of `hybridlm.ops.triton.conv`), kernel by kernel from
torch.profiler (ms per call). The default shape is hybrid-1b's conv: 2 x 8192 tokens, 6144 channels.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch

import hybridlm.ops.triton.conv as conv
from hybridlm.ops.conv import causal_conv1d

# (BLOCK_T, BLOCK_C, NUM_WARPS) of the forward and dx passes, (DZ_BLOCK_T, DZ_BLOCK_C, DZ_ROW_BLOCKS, DZ_NUM_WARPS).
CONFIGS = [
    ((32, 128, 4), (16, 64, 16, 4)),
    ((64, 64, 4), (16, 64, 16, 4)),
    ((32, 128, 4), (16, 64, 8, 4)),
    ((32, 128, 4), (32, 64, 8, 4)),
    ((32, 128, 4), (8, 128, 16, 4)),
]


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def check(args) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    c = args.channels
    x = torch.randn(1, 2048, c, device="cuda", generator=gen)
    w = torch.randn(c, 1, args.width, device="cuda", generator=gen) * 0.5
    dy = torch.randn(1, 2048, c, device="cuda", generator=gen)
    for cu in (None, torch.tensor([0, 1, 300, 1000, 2048], device="cuda")):
        ref_in = [x.double().requires_grad_(True), w.double().requires_grad_(True)]
        y_ref, _ = causal_conv1d(*ref_in, cu_seqlens=cu)
        ref = torch.autograd.grad(y_ref, ref_in, dy.double())
        got_in = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        y, _ = conv.causal_conv1d_triton(*got_in, cu_seqlens=cu)
        got = torch.autograd.grad(y, got_in, dy)
        print(f"check {'documents' if cu is not None else 'plain'} (float32 vs float64): y {_rel(y, y_ref):.1e} "
              f"dx {_rel(got[0], ref[0]):.1e} dweight {_rel(got[1], ref[1]):.1e}")


def time_config(x, w, dy, main, dz, reps: int) -> dict[str, float]:
    conv.BLOCK_T, conv.BLOCK_C, conv.NUM_WARPS = main
    conv.DZ_BLOCK_T, conv.DZ_BLOCK_C, conv.DZ_ROW_BLOCKS, conv.DZ_NUM_WARPS = dz
    xx, ww = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

    def step():
        y, _ = conv.causal_conv1d_triton(xx, ww)
        torch.autograd.grad(y, [xx, ww], dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name if event.name.startswith("_conv") else "other (dweight sum, casts)"
            times[name] += event.time_range.elapsed_us() / 1e3 / reps
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--channels", type=int, default=6144)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    check(args)
    gen = torch.Generator(device="cuda").manual_seed(1)
    shape = (args.batch, args.seq_len, args.channels)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(args.channels, 1, args.width, device="cuda", generator=gen) * 0.5).bfloat16()
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    gb = x.numel() * 2 / 1e9
    print(f"\nbf16 {shape}, width {args.width}; reading x and writing y at 4.8 TB/s would take {2 * gb / 4.8:.3f} ms")
    print("| fwd/dx blocks (T, C, warps) | dz blocks (T, C, row blocks, warps) | fwd ms | dz ms | dx ms | other ms | bwd ms |")
    print("|---|---|---|---|---|---|---|")
    for main_cfg, dz_cfg in CONFIGS:
        t = time_config(x, w, dy, main_cfg, dz_cfg, args.reps)
        fwd, dz, dx = t["_conv_fwd_kernel"], t["_conv_dz_kernel"], t["_conv_dx_kernel"]
        other = t["other (dweight sum, casts)"]
        print(f"| {main_cfg} | {dz_cfg} | {fwd:.3f} | {dz:.3f} | {dx:.3f} | {other:.3f} | {dz + dx + other:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
