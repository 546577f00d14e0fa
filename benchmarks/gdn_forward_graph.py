"""GPU time of the chunked GDN forward, hybridlm's against fla's, with the host taken out.

    python benchmarks/gdn_forward_graph.py [--variants JSON] [--shapes 0,1,2] [--reps 2] [--no-fla] [--backward]

`gdn_gpu.py` times calls back to back with `triton.testing.do_bench`, so a call whose host side
(argument handling, launches) takes longer than its kernels measures the host: fla's forward
measured 0.66 to 2.3 ms at the same shape in different processes. This script records N calls into
one CUDA graph and times its replay (GPU time only), sums the kernels' times from the profiler, and
also reports do_bench, for each hybridlm variant (KernelOptions fields as JSON: {"label": {...}})
and for fla's chunk_gated_delta_rule (if installed) at the issue's shapes, inputs bf16 without
gradients. Each hybridlm variant's output is compared with the first's (bitwise). A markdown table
comes last.

--backward times forward + backward instead (the gradients of q, k, v, g and beta for a fixed
random dO, all captured in the graph), hybridlm's variants only: fla 0.6.0's backward refuses to run
on Hopper with Triton 3.6. The variants' gradients are compared with the first's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gdn_gpu  # noqa: E402

from hybridlm.ops.gated_delta_rule.triton import chunk_split  # noqa: E402


def graph_ms(fn, calls: int = 10) -> float:
    """Milliseconds per call of `calls` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, autotunes) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=300, return_mode="median") / calls


def kernel_ms(fn, calls: int = 10) -> tuple[float, dict[str, float]]:
    """Total and per-kernel GPU milliseconds per call, from the profiler."""
    kernels = {name: ms for name, (_, ms) in gdn_gpu.kernel_times(fn, calls).items()}
    return sum(kernels.values()), kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default='{"default": {}}', help="JSON {label: {KernelOptions field: value}}")
    parser.add_argument("--shapes", default="0,1,2", help="indices into gdn_gpu.ISSUE_SHAPES")
    parser.add_argument("--reps", type=int, default=2, help="passes over all shapes and variants")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--backward", action="store_true", help="forward + backward, hybridlm only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gdn_forward_graph.py times CUDA graphs: it needs a CUDA GPU")
    variants = json.loads(args.variants)
    fields = {field.name for field in dataclasses.fields(chunk_split.KernelOptions)}
    for label, options in variants.items():
        unknown = set(options) - fields
        if unknown:
            raise SystemExit(f"variant {label!r}: {sorted(unknown)} are not KernelOptions fields ({sorted(fields)})")
    fla = None
    if not args.no_fla and not args.backward:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla
        except ImportError as exc:
            print(f"fla not timed: {exc}")
    shapes = [gdn_gpu.ISSUE_SHAPES[int(i)] for i in args.shapes.split(",")]
    defaults = chunk_split.KernelOptions()

    def use(options: dict) -> None:
        for field in fields:
            setattr(chunk_split.SPLIT_OPTIONS, field, options.get(field, getattr(defaults, field)))

    rows = []
    for rep in range(args.reps):
        for shape in shapes:
            q, k, v, g, beta = gdn_gpu.make_inputs(*shape)
            run = lambda: chunk_split.chunk_gated_delta_rule_triton_split(q, k, v, g, beta)  # noqa: E731
            if args.backward:
                leaves = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta)]
                do = torch.randn_like(v)

                def run(leaves=leaves, do=do):
                    o, _ = chunk_split.chunk_gated_delta_rule_triton_split(*leaves)
                    return torch.autograd.grad(o, leaves, do)

            impls = [(label, options, run) for label, options in variants.items()]
            if fla is not None:
                impls.append((f"fla {gdn_gpu._fla_version()}", None,
                              lambda: fla(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)))
            first = None
            with torch.set_grad_enabled(args.backward):
                for label, options, fn in impls:
                    same = ""
                    if options is not None:
                        use(options)
                        out = torch.cat([x.float().flatten() for x in fn()]) if args.backward else fn()[0]
                        first = out if first is None else first
                        same = "yes" if torch.equal(out, first) else "NO"
                    replay = graph_ms(fn)
                    total, kernels = kernel_ms(fn)
                    called = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
                    rows.append((rep, shape, label, replay, total, called, same))
                    detail = {name: round(ms, 4) for name, ms in kernels.items()}
                    print(f"[{'fwd+bwd' if args.backward else 'forward'}] rep {rep} {shape} {label}: graph {replay:.4f} kernels {total:.4f} "
                          f"do_bench {called:.4f} ms {detail}", flush=True)
            use({})
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    print("| rep | (B, T, H, K, V) | implementation | graph replay ms | kernel sum ms | do_bench ms | output = first variant's |")
    print("|---|---|---|---|---|---|---|")
    for rep, shape, label, replay, total, called, same in rows:
        print(f"| {rep} | {shape} | {label} | {replay:.3f} | {total:.3f} | {called:.3f} | {same or '-'} |")


if __name__ == "__main__":
    main()
