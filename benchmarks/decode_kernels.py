"""Kernels per decode step, counted on the CPU: the reference blocks vs the fused decode path.

Builds a model with the layer structure of a preset (same layer kinds, head counts and options;
widths shrunk so that Triton's interpreter runs it in seconds), prefills a batch, then counts what
one `HybridLM.decode_step` would launch on a GPU:

- every aten op that launches a kernel on CUDA (views, empty allocations and no-op conversions
  launch none); host synchronisations are counted apart (there should be none);
- the Triton kernels, run in Triton's interpreter (TRITON_INTERPRET=1), one launch each;
- as on CUDA, the reference path's conv and gated norm go to their Triton versions and GDN uses
  gdn_impl="triton"; `F.rms_norm` counts as one kernel (torch's fused CUDA RMSNorm; on the CPU it
  decomposes) and `F.scaled_dot_product_attention` as one (CUDA may add a mask conversion).

Kernel count is what bounds a CUDA-graph decode step at small batch; the weights read are the same.

    python benchmarks/decode_kernels.py --presets hybrid-1b olmo3-1b --batch 8 --by-op
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import hybridlm.nn.gated_deltanet as gated_deltanet_module  # noqa: E402
import hybridlm.nn.norm as norm_module  # noqa: E402
from hybridlm.models import HybridLM, get_preset  # noqa: E402
from hybridlm.ops.triton.conv import causal_conv1d_triton  # noqa: E402
from hybridlm.ops.triton.norm import gated_rms_norm_triton  # noqa: E402

NO_KERNEL = {
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.lift_fresh.default,
    torch.ops.aten._unsafe_view.default,  # a view that autograd treats as a new tensor
    torch.ops.aten.promote_types.default,  # dtype arithmetic, no tensor
}
HOST_SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
ONE_KERNEL = {F.rms_norm: "rms_norm (fused)", F.scaled_dot_product_attention: "sdpa"}


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops (by name) while active; `paused` stops counting."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.host_syncs = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "hybridlm":  # a custom op: count what its implementation runs
            with self:
                return OPDEFS[func.name().removesuffix(".default")]._init_fn(*args, **kwargs)
        if not self.paused:
            if func in HOST_SYNC:
                self.host_syncs += 1
            elif not func.is_view and func not in NO_KERNEL:
                self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


class FusedCalls(TorchFunctionMode):
    """Counts the functions of ONE_KERNEL once each and hides the ops they decompose into."""

    def __init__(self, counter: KernelCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ONE_KERNEL and not self.counter.paused:
            self.counter.counts[ONE_KERNEL[func]] += 1
            self.counter.paused += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.counter.paused -= 1
        return func(*args, **kwargs)


def count_triton_launches(counter: KernelCounter):
    """Wrap the interpreter's kernel launch: one count per launch, nothing counted inside."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not counter.paused:
            counter.counts[f"triton {self.fn.__name__}"] += 1
        counter.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    return lambda: setattr(InterpretedFunction, "run", original)


def route_reference_path_to_triton() -> None:
    """What `causal_conv1d` and `gated_rms_norm` do for CUDA tensors, done for CPU tensors."""
    gated_deltanet_module.causal_conv1d = causal_conv1d_triton
    norm_module.gated_rms_norm = gated_rms_norm_triton


def shrunk_model(preset: str, dtype: torch.dtype) -> HybridLM:
    """The preset's layers and head counts with small widths (kernel counts do not depend on them)."""
    config = get_preset(preset)
    heads, kv_heads = config.n_heads, config.n_kv_heads
    gdn_heads, gdn_value_heads = config.gdn_key_heads, config.gdn_value_heads
    small = config.replace(
        vocab_size=512, pad_token_id=None, eos_token_id=None, d_model=64, head_dim=16, mlp_hidden=96,
        max_seq_len=256, n_heads=heads, n_kv_heads=kv_heads,
        gdn_key_heads=gdn_heads, gdn_value_heads=gdn_value_heads, gdn_key_head_dim=16, gdn_value_head_dim=32,
        sliding_window=min(config.sliding_window or 8, 8),
    )
    torch.manual_seed(0)
    return HybridLM(small).to(dtype).eval()


@torch.no_grad()
def count_step(model: HybridLM, batch: int, fused: bool, prompt_length: int = 12) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_length + 2))
    cache = model.allocate_cache(batch, prompt_length + 2)
    model(ids[:, :prompt_length], cache=cache)
    model.decode_step(ids[:, prompt_length : prompt_length + 1], cache, gdn_impl="triton", fused=fused)  # warm
    counter = KernelCounter()
    restore = count_triton_launches(counter)
    try:
        with FusedCalls(counter), counter:
            model.decode_step(ids[:, prompt_length + 1 : prompt_length + 2], cache, gdn_impl="triton", fused=fused)
    finally:
        restore()
    return {"kernels": sum(counter.counts.values()), "host_syncs": counter.host_syncs, "by_op": dict(counter.counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["hybrid-1b", "olmo3-1b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="model dtype (float32 drops the casts that bf16 needs)")
    parser.add_argument("--by-op", action="store_true", help="also print the count of every op")
    args = parser.parse_args(argv)
    route_reference_path_to_triton()
    rows = []
    for preset in args.presets:
        model = shrunk_model(preset, getattr(torch, args.dtype))
        for fused in (False, True):
            path = "fused" if fused else "reference"
            row = {"preset": preset, "batch": args.batch, "dtype": args.dtype, "path": path,
                   **count_step(model, args.batch, fused)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(f"{'preset':<12} {'path':<10} {'kernels/step':>12} {'host syncs':>10}")
    for row in rows:
        print(f"{row['preset']:<12} {row['path']:<10} {row['kernels']:>12} {row['host_syncs']:>10}")
    if args.by_op:
        for row in rows:
            print(f"\n{row['preset']} {row['path']}:")
            for name, count in sorted(row["by_op"].items(), key=lambda item: -item[1]):
                print(f"  {count:>5}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
