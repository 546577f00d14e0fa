"""GPU check and benchmark of hybridlm's Triton kernels: the gated delta rule (chunked fwd/bwd and the
decode step), the fused short conv + SiLU and the fused gated RMSNorm.

    python benchmarks/gdn_gpu.py [--out DIR] [--skip-check] [--skip-time] [--quick] [--impls NAME ...]
        [--gdn-only] [--profile] [--sweep] [--fla] [--budget SECONDS]

1. Correctness, bf16 inputs (g, beta float32, as the layer makes them) against a float64 reference
   computed from the same values: the plain token loop at small sizes, hybridlm's PyTorch chunk path
   in float64 at large ones (itself tested against the loop). Shapes include grouped values, T not
   a multiple of 64, packed documents (with an empty and a one-token document), extreme gates
   (decays down to exp(-30) and exactly 1) and a 64K-token sequence. Relative error
   ||x - ref|| / ||ref|| of o, the final state and every gradient; the issue's bar is 5e-3.
2. Timings (triton.testing.do_bench, median; inputs are several times the 60 MB L2): forward and
   forward+backward at the issue's shapes of the chunked implementation ("triton-split", the
   split-bf16 kernels, the default on GPUs), fla's chunk_gated_delta_rule (forward)
   and PyTorch's flash SDPA causal attention with the same B, T, heads and head dim 128. --sweep
   times launch settings of "triton-split" (`SPLIT_OPTIONS`) at the first shape, each checked
   against the default settings' output and gradients.
3. The conv, gated norm and decode kernels against the PyTorch paths they replace (not with --gdn-only).

Prints Markdown tables last; writes results.json under --out after every step (print them again
with --print-only). --budget: seconds after which the optional steps (sweep, profile, fla) are skipped.
A kernel fault ends the CUDA context and so the process: run the implementations in separate
processes (--impls) when one of them is untested on the GPU at hand, and CUDA_LAUNCH_BLOCKING=1
names the faulting launch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import hybridlm.ops.conv as conv_module
import hybridlm.ops.norm as norm_module
from hybridlm.ops.gated_delta_rule import gated_delta_rule, naive_gated_delta_rule
from hybridlm.ops.gated_delta_rule.triton import (
    SPLIT_OPTIONS,
    chunk_gated_delta_rule_triton_split,
    gated_delta_rule_decode_,
)

# The chunked implementations by backend name: "triton-split" (the split-bf16 kernels,
# triton/chunk_split.py, whose launch settings SWEEP varies; auto's choice on CUDA). The first, tf32
# kernels ("triton" until the third GPU session) were removed; their numbers stay in docs/benchmarks.md.
IMPLS = {"triton-split": chunk_gated_delta_rule_triton_split}

# Launch settings timed with --sweep at the first shape (the sequential kernels' V tiles and
# pipelining depth, the parallel kernels' V tiles).
SWEEP = [
    dict(state_fwd_block_v=16),
    dict(state_fwd_block_v=64),
    dict(state_bwd_block_v=32),
    dict(stages_state=3),
    dict(output_block_v=64),
    dict(prepare_block_v=32),
    dict(grad_local_block_v=64, stages_grad_local=1),
    dict(stages_grad_state=1),
    dict(grad_state_block_v=32, stages_grad_state=2),
    dict(one_term_state_products=True),
    dict(one_term_w=True),
    dict(one_term_state_products=True, one_term_w=True),  # the fourth session's fastest (opt-in)
]
_DEFAULTS = dict(SPLIT_OPTIONS.__dict__)
ISSUE_SHAPES = [(1, 8192, 30, 96, 192), (4, 4096, 16, 96, 192), (8, 2048, 16, 128, 128)]
START = time.time()
RUN_IMPLS = list(IMPLS)  # --impls


def set_options(**extra) -> None:
    SPLIT_OPTIONS.__dict__.update(_DEFAULTS)
    SPLIT_OPTIONS.__dict__.update(extra)


def elapsed() -> float:
    return time.time() - START


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(batch, seq_len, heads, key_dim, value_dim, *, value_heads=None, gates="model", seed=0, device=None,
                dtype=torch.bfloat16):
    """q, k, v in dtype (bf16 by default); float32 g, beta as the layer produces them."""
    value_heads = value_heads or heads
    device = device or DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = randn(batch, seq_len, heads, key_dim).to(dtype)
    k = randn(batch, seq_len, heads, key_dim).to(dtype)
    v = randn(batch, seq_len, value_heads, value_dim).to(dtype)
    if gates == "model":  # g = -exp(A_log) softplus(a + dt_bias), A in (0, 16)
        a_rate = torch.rand(value_heads, generator=gen, device=device) * 16
        g = -a_rate * F.softplus(randn(batch, seq_len, value_heads) - 4.0)
    elif gates == "none":  # no decay at all: only the delta rule's own overwriting forgets
        g = torch.zeros(batch, seq_len, value_heads, device=device)
    elif gates == "extreme":  # per-step decays down to exp(-30), every 7th exactly 1
        g = -30.0 * torch.rand(batch, seq_len, value_heads, generator=gen, device=device)
        g[:, ::7] = 0.0
    else:
        raise ValueError(gates)
    beta = 2.0 * torch.sigmoid(randn(batch, seq_len, value_heads))
    return q, k, v, g, beta


def check_case(name, batch, seq_len, heads, value_heads, key_dim, value_dim, *, gates="model", cu=None,
               with_state=True, reference="chunk", grads=True, dtype=torch.bfloat16):
    device = DEVICE
    q, k, v, g, beta = make_inputs(batch, seq_len, heads, key_dim, value_dim, value_heads=value_heads, gates=gates,
                                   dtype=dtype)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=device, dtype=torch.int64)
    num_seqs = batch if cu is None else len(cu) - 1
    gen = torch.Generator(device=device).manual_seed(1)
    h0 = torch.randn(num_seqs, value_heads, key_dim, value_dim, generator=gen, device=device) if with_state else None
    do = torch.randn(v.shape, generator=gen, device=device).to(dtype)
    dht = torch.randn(num_seqs, value_heads, key_dim, value_dim, generator=gen, device=device)
    leaves = [q, k, v, g, beta] + ([h0] if with_state else [])
    names = ["dq", "dk", "dv", "dg", "dbeta"] + (["dh0"] if with_state else [])

    ref_leaves = [x.detach().double().requires_grad_(grads) for x in leaves]
    rq, rk, rv, rg, rb = ref_leaves[:5]
    rh0 = ref_leaves[5] if with_state else None
    kwargs = dict(output_final_state=True, cu_seqlens=cu_seqlens)
    if reference == "naive":
        ref_o, ref_s = naive_gated_delta_rule(rq, rk, rv, rg, rb, initial_state=rh0, **kwargs)
    else:
        ref_o, ref_s = gated_delta_rule(rq, rk, rv, rg, rb, initial_state=rh0, impl="chunk", **kwargs)
    ref_grads = []
    if grads:
        ref_grads = torch.autograd.grad((ref_o * do.double()).sum() + (ref_s * dht.double()).sum(), ref_leaves)
    del ref_leaves
    set_options()
    results = {}
    for impl in RUN_IMPLS:
        tl_leaves = [x.detach().clone().requires_grad_(grads) for x in leaves]
        tq, tk, tv, tg, tb = tl_leaves[:5]
        th0 = tl_leaves[5] if with_state else None
        # Every buffer the kernels allocate starts as NaN: a value never written cannot pass.
        with poisoned_allocations():
            o, s = IMPLS[impl](tq, tk, tv, tg, tb, initial_state=th0, **kwargs)
            got = torch.autograd.grad((o * do).sum() + (s * dht).sum(), tl_leaves) if grads else []
            if not DRY_RUN:
                torch.cuda.synchronize()  # a fault shows up here, in this case and implementation
        errors = {"o": rel(o, ref_o), "ht": rel(s, ref_s)}
        finite = bool(torch.isfinite(o).all()) and bool(torch.isfinite(s).all())
        for n, a, b in zip(names, got, ref_grads):
            errors[n] = rel(a, b)
            finite = finite and bool(torch.isfinite(a).all())
        worst = max(errors.values())
        results[impl] = {"errors": errors, "finite": finite, "worst": worst, "pass": finite and worst < 5e-3}
        print(f"[check] {name} {impl}: worst {worst:.2e} finite={finite} " +
              " ".join(f"{key} {val:.1e}" for key, val in errors.items()), flush=True)
    return results


class poisoned_allocations:
    """torch.empty fills float tensors with NaN inside this context (PyTorch's deterministic mode)."""

    def __enter__(self):
        import torch.utils.deterministic as det

        self.saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                      det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True

    def __exit__(self, *exc):
        import torch.utils.deterministic as det

        torch.use_deterministic_algorithms(self.saved[0], warn_only=self.saved[1])
        det.fill_uninitialized_memory = self.saved[2]


def run_checks(quick: bool) -> dict:
    if DRY_RUN and CPU_STUDY:
        cases = [
            ("T=256", dict(batch=1, seq_len=256, heads=2, value_heads=2, key_dim=96, value_dim=192)),
            ("T=1000", dict(batch=1, seq_len=1000, heads=2, value_heads=2, key_dim=96, value_dim=192)),
            ("extreme gates", dict(batch=1, seq_len=300, heads=2, value_heads=2, key_dim=128, value_dim=128, gates="extreme")),
        ]
    elif DRY_RUN:
        cases = [("dry", dict(batch=1, seq_len=70, heads=1, value_heads=2, key_dim=16, value_dim=32, reference="naive")),
                 ("dry docs", dict(batch=1, seq_len=90, heads=1, value_heads=1, key_dim=16, value_dim=16,
                                   gates="extreme", cu=[0, 1, 30, 30, 90]))]
    else:
        cases = [
            ("gva T=1000 naive", dict(batch=2, seq_len=1000, heads=2, value_heads=4, key_dim=96, value_dim=192, reference="naive")),
            ("docs+extreme gates", dict(batch=1, seq_len=4096, heads=4, value_heads=4, key_dim=128, value_dim=128,
                                        gates="extreme", cu=[0, 1, 300, 300, 1000, 4096])),
            ("7B shape T=8191", dict(batch=1, seq_len=8191, heads=30, value_heads=30, key_dim=96, value_dim=192)),
            ("1B shape T=4096", dict(batch=2, seq_len=4096, heads=16, value_heads=16, key_dim=128, value_dim=256, with_state=False)),
            ("64K tokens", dict(batch=1, seq_len=65536, heads=4, value_heads=4, key_dim=128, value_dim=256)),
            # No decay (g = 0): the one-term products' errors accumulate most (gdn_precision_study.py).
            ("no decay T=4096", dict(batch=1, seq_len=4096, heads=2, value_heads=4, key_dim=96, value_dim=192, gates="none")),
            # float32 inputs (a float32 model): every operand split, the one-term shortcuts off.
            ("float32 inputs, docs", dict(batch=1, seq_len=1000, heads=2, value_heads=4, key_dim=96, value_dim=192,
                                          cu=[0, 300, 1000], dtype=torch.float32)),
        ]
        if quick:
            cases = [cases[0], cases[1], cases[4]]
    out = {}
    for name, kw in cases:
        try:
            out[name] = check_case(name, **kw)
        except Exception as exc:  # keep going: one failing case must not hide the others
            traceback.print_exc()
            out[name] = {"error": repr(exc)[:300]}
        if not DRY_RUN:
            torch.cuda.empty_cache()
    return out


DEVICE = "cuda"
DRY_RUN = False  # --dry-run: tiny shapes on CPU under TRITON_INTERPRET=1, each timed call run once
CPU_STUDY = False  # --cpu-study: the accuracy cases of docs/benchmarks.md on CPU (implies --dry-run --skip-time)


def bench(fn, rep=200):
    if DRY_RUN:
        fn()
        return 0.0
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def _time_impl(label, fn, leaves, do, rows, shape, forward_only=False):
    try:
        row = {"impl": label, "fwd_ms": bench(lambda: fn()[0])}
        if not forward_only:
            row["fwd_bwd_ms"] = bench(lambda: torch.autograd.grad(fn()[0], leaves, do))
    except Exception as exc:
        traceback.print_exc()
        row = {"impl": label, "error": repr(exc)[:300]}
    rows.append(row)
    print(f"[time] {shape} {row} at {elapsed():.0f}s", flush=True)


def _time_chunked(shape, rows) -> None:
    q, k, v, g, beta = make_inputs(*shape)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)
    set_options()
    for impl in RUN_IMPLS:
        fn = IMPLS[impl]
        _time_impl(f"hybridlm {impl}", lambda fn=fn: fn(q, k, v, g, beta), leaves, do, rows, shape)


def gdn_timings(batch, seq_len, heads, key_dim, value_dim):
    """hybridlm's chunked implementations (--impls), then flash SDPA with head dim 128."""
    shape = (batch, seq_len, heads, key_dim, value_dim)
    rows = []
    _time_chunked(shape, rows)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    aq, ak, av = (torch.randn(batch, heads, seq_len, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _time_impl("flash-sdpa (d=128)", lambda: (F.scaled_dot_product_attention(aq, ak, av, is_causal=True),),
                   [aq, ak, av], torch.randn_like(aq), rows, shape)
    return rows


def sweep_timings(batch, seq_len, heads, key_dim, value_dim) -> list[dict]:
    """"triton-split" with the settings in SWEEP; each run's output and gradients are compared with
    those of the default settings."""
    shape = (batch, seq_len, heads, key_dim, value_dim)
    q, k, v, g, beta = make_inputs(batch, seq_len, heads, key_dim, value_dim)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def outputs():
        o = chunk_gated_delta_rule_triton_split(q, k, v, g, beta)[0]
        return [o.detach()] + list(torch.autograd.grad(o, leaves, do))

    set_options()
    want = outputs()
    rows = []
    for extra in SWEEP:
        if elapsed() > BUDGET:
            print(f"[time] budget reached: sweep stopped before {extra}", flush=True)
            break
        set_options(**extra)
        label = "hybridlm triton-split " + " ".join(f"{key}={val}" for key, val in extra.items())
        try:
            diff = max(rel(a, b) for a, b in zip(outputs(), want))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"impl": label, "error": repr(exc)[:300]})
            continue
        _time_impl(label, lambda: chunk_gated_delta_rule_triton_split(q, k, v, g, beta), leaves, do, rows, shape)
        rows[-1]["rel_diff_to_default"] = diff
    set_options()
    return rows


def fla_timings(batch, seq_len, heads, key_dim, value_dim) -> list[dict]:
    """fla's chunk_gated_delta_rule, forward only (its backward refuses Triton 3.4-3.7.0 on Hopper)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    shape = (batch, seq_len, heads, key_dim, value_dim)
    q, k, v, g, beta = make_inputs(batch, seq_len, heads, key_dim, value_dim)
    rows = []
    _time_impl("fla " + _fla_version(), lambda: fla_chunk(q, k, v, g, beta, use_qk_l2norm_in_kernel=True),
               [q, k, v, g, beta], None, rows, shape, forward_only=True)
    return rows


def _fla_version() -> str:
    try:
        import fla

        return fla.__version__
    except ImportError:
        return "?"


def kernel_times(step, steps: int = 3) -> dict[str, tuple[float, float]]:
    """{kernel name (60 characters): (calls per step, GPU ms per step)} of `step`, from
    torch.profiler over `steps` calls after one warm-up call."""
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            times[event.key[:60]] = (event.count / steps, total / steps / 1e3)
    return times


def profile_kernels(batch, seq_len, heads, key_dim, value_dim) -> list[dict]:
    """GPU time per kernel of one forward+backward of the first of --impls (torch.profiler, mean of
    3 runs after a warm-up)."""
    q, k, v, g, beta = make_inputs(batch, seq_len, heads, key_dim, value_dim)
    leaves = [x.requires_grad_(True) for x in (q, k, v, g, beta)]
    do = torch.randn_like(v)

    def step():
        return torch.autograd.grad(IMPLS[RUN_IMPLS[0]](q, k, v, g, beta)[0], leaves, do)

    rows = [{"kernel": name, "calls_per_step": calls, "ms_per_step": ms} for name, (calls, ms) in kernel_times(step).items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    for r in rows[:14]:
        print(f"[profile] {r['kernel']:60s} {r['calls_per_step']:4.1f} calls {r['ms_per_step']:.3f} ms", flush=True)
    return rows


def small_op_timings() -> list[dict]:
    """Conv (+SiLU) and gated norm at 1B-hybrid sizes, decode steps at 7B sizes: Triton vs PyTorch."""
    rows = []
    batch, seq_len, channels = (1, 64, 64) if DRY_RUN else (4, 4096, 2 * 2048 + 4096)
    x = torch.randn(batch, seq_len, channels, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(channels, 1, 4, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    xo = torch.randn(batch, seq_len, 16, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn_like(xo, requires_grad=True)
    wn = torch.ones(256, device=DEVICE, requires_grad=True)
    for flag in (True, False):
        conv_module.TRITON_AVAILABLE = flag
        norm_module.TRITON_AVAILABLE = flag
        label = "triton" if flag else "pytorch"

        def conv():
            return conv_module.causal_conv1d(x, w)[0]

        def norm():
            return norm_module.gated_rms_norm(xo, gate, wn, 1e-5)

        rows.append({"op": "conv+silu [4,4096,8192]", "impl": label, "fwd_ms": bench(conv),
                     "fwd_bwd_ms": bench(lambda: torch.autograd.grad(conv(), (x, w), dy))})
        rows.append({"op": "gated norm [4,4096,16,256]", "impl": label, "fwd_ms": bench(norm),
                     "fwd_bwd_ms": bench(lambda: torch.autograd.grad(norm(), (xo, gate, wn), xo))})
    conv_module.TRITON_AVAILABLE = norm_module.TRITON_AVAILABLE = True
    for dec_batch in (1,) if DRY_RUN else (1, 32, 256):
        q, k, v, g, beta = make_inputs(dec_batch, 1, 30, 96, 192)
        state = torch.randn(dec_batch, 30, 96, 192, device=DEVICE)
        t_triton = bench(lambda: gated_delta_rule_decode_(q, k, v, g, beta, state), rep=100)
        t_torch = bench(lambda: gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                 impl="recurrent"), rep=100)
        rows.append({"op": f"decode step B={dec_batch} HV=30 K=96 V=192", "impl": "triton", "fwd_ms": t_triton})
        rows.append({"op": f"decode step B={dec_batch} HV=30 K=96 V=192", "impl": "pytorch", "fwd_ms": t_torch})
    return rows


def small_op_checks() -> dict:
    """Conv and gated norm on the GPU, bf16, against their PyTorch bodies in float64."""
    out = {}
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    tokens, channels = (60, 40) if DRY_RUN else (3000, 1000)
    x = torch.randn(1, tokens, channels, device=DEVICE, generator=gen).bfloat16()
    w = torch.randn(channels, 1, 4, device=DEVICE, generator=gen)
    cu = torch.tensor([0, 1, 5, 5, tokens - 10, tokens], device=DEVICE)
    dy = torch.randn_like(x)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)]
    y, f = conv_module.causal_conv1d(x, w, cu_seqlens=cu, output_final_state=True)
    got = torch.autograd.grad((y * dy).sum(), leaves)
    conv_module.TRITON_AVAILABLE = False
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ry, rf = conv_module.causal_conv1d(*ref_leaves, cu_seqlens=cu, output_final_state=True)
    want = torch.autograd.grad((ry * dy.double()).sum(), ref_leaves)
    conv_module.TRITON_AVAILABLE = True
    out["conv"] = {"y": rel(y, ry), "final": rel(f, rf), "dx": rel(got[0], want[0]), "dw": rel(got[1], want[1])}
    xo = torch.randn(2, 100, 30, 192, device=DEVICE, generator=gen).bfloat16()
    gate = torch.randn_like(xo)
    wn = torch.rand(192, device=DEVICE, generator=gen) + 0.5
    leaves = [xo.requires_grad_(True), gate.requires_grad_(True), wn.requires_grad_(True)]
    y = norm_module.gated_rms_norm(*leaves, 1e-5)
    dy = torch.randn_like(y)
    got = torch.autograd.grad((y * dy).sum(), leaves)
    norm_module.TRITON_AVAILABLE = False
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ry = norm_module.gated_rms_norm(*ref_leaves, 1e-5)
    want = torch.autograd.grad((ry * dy.double()).sum(), ref_leaves)
    norm_module.TRITON_AVAILABLE = True
    out["gated_norm"] = {"y": rel(y, ry), "dx": rel(got[0], want[0]), "dgate": rel(got[1], want[1]), "dw": rel(got[2], want[2])}
    print(f"[check] small ops {out}", flush=True)
    return out


def environment() -> dict:
    import triton

    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "triton": triton.__version__}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        env["driver"] = "?"
    try:
        import fla

        env["fla"] = fla.__version__
    except ImportError:
        env["fla"] = None
    env["date"] = time.strftime("%Y-%m-%d")
    return env


BUDGET = float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--quick", action="store_true", help="three check cases instead of five")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1): test the script")
    parser.add_argument("--cpu-study", action="store_true",
                        help="accuracy at model head sizes on CPU (TRITON_INTERPRET=1; slow): implies --dry-run --skip-time")
    parser.add_argument("--gdn-only", action="store_true", help="skip the conv, gated norm and decode kernels")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU time at the first shape")
    parser.add_argument("--sweep", action="store_true", help="time the launch settings in SWEEP at the first shape")
    parser.add_argument("--fla", action="store_true", help="time fla's forward too")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS), help="chunked implementations to run")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds after which optional steps are skipped")
    parser.add_argument("--options", default="{}", help="JSON of KernelOptions fields to change for every run")
    parser.add_argument("--print-only", action="store_true", help="print the tables of --out/results.json")
    args = parser.parse_args()
    if args.print_only:
        with open(os.path.join(args.out, "results.json")) as handle:
            print_tables(json.load(handle))
        return 0
    global DEVICE, DRY_RUN, ISSUE_SHAPES, BUDGET, CPU_STUDY
    BUDGET = args.budget
    if args.cpu_study:
        CPU_STUDY = args.dry_run = args.skip_time = args.gdn_only = True
    _DEFAULTS.update(json.loads(args.options))
    if args.dry_run:
        DEVICE, DRY_RUN, ISSUE_SHAPES = "cpu", True, [(1, 70, 2, 16, 32)]
    elif not torch.cuda.is_available():
        print("benchmarks/gdn_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    RUN_IMPLS[:] = args.impls
    results = {"env": environment(), "command": " ".join(sys.argv), "options": _DEFAULTS}
    print(results["env"], flush=True)
    if not args.skip_check:
        results["checks"] = run_checks(args.quick)
        _save(results, args.out)
        if not args.gdn_only:
            try:
                results["small_op_checks"] = small_op_checks()
            except Exception as exc:
                traceback.print_exc()
                results["small_op_checks"] = {"error": repr(exc)}
            _save(results, args.out)
    if not args.skip_time:
        results["timings"] = {}
        steps = [(shape, gdn_timings) for shape in ISSUE_SHAPES]
        if args.sweep:
            steps.append((ISSUE_SHAPES[0], sweep_timings))
        if args.fla:
            steps += [(shape, fla_timings) for shape in ISSUE_SHAPES]
        for number, (shape, step) in enumerate(steps):
            if number >= len(ISSUE_SHAPES) and elapsed() > BUDGET:
                print(f"[time] budget reached: {step.__name__} {shape} skipped", flush=True)
                continue
            try:
                rows = step(*shape)
            except Exception as exc:
                traceback.print_exc()
                rows = [{"impl": step.__name__, "error": repr(exc)[:300]}]
            results["timings"].setdefault(str(shape), []).extend(rows)
            if not DRY_RUN:
                torch.cuda.empty_cache()
            _save(results, args.out)
            if number == len(ISSUE_SHAPES) - 1 and args.profile:
                set_options()
                try:
                    results["profile"] = profile_kernels(*ISSUE_SHAPES[0])
                except Exception as exc:
                    traceback.print_exc()
                    results["profile"] = [{"kernel": "error " + repr(exc)[:100], "calls_per_step": 0, "ms_per_step": 0}]
                _save(results, args.out)
        if not args.gdn_only:
            try:
                results["small_ops"] = small_op_timings()
            except Exception as exc:
                traceback.print_exc()
                results["small_ops"] = [{"error": repr(exc)}]
            _save(results, args.out)
    results["seconds"] = elapsed()
    _save(results, args.out)
    print_tables(results)
    return 0


def _save(results: dict, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)


def print_tables(results: dict) -> None:
    env = results["env"]
    print(f"\n{env['date']} {env['gpu']} driver {env.get('driver')} torch {env['torch']} triton {env['triton']} fla {env['fla']}")
    if "checks" in results:
        print("\n| case | impl | worst rel err | finite | pass | errors |\n|---|---|---|---|---|---|")
        for case, per_impl in results["checks"].items():
            if "error" in per_impl:
                print(f"| {case} | | ERROR {per_impl['error'][:100]} | | | |")
                continue
            for impl, r in per_impl.items():
                errs = " ".join(f"{key} {val:.1e}" for key, val in r["errors"].items())
                print(f"| {case} | {impl} | {r['worst']:.2e} | {r['finite']} | {r['pass']} | {errs} |")
    if "small_op_checks" in results:
        print(f"\nsmall-op checks: {results['small_op_checks']}")
    if "timings" in results:
        print("\n| (B,T,H,K,V) | impl | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
        for shape, rows in results["timings"].items():
            for r in rows:
                fwd = f"{r['fwd_ms']:.3f}" if "fwd_ms" in r else r.get("error", "")[:90]
                fb = f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else ""
                note = f" (diff {r['rel_diff_to_default']:.0e})" if "rel_diff_to_default" in r else ""
                print(f"| {shape} | {r.get('impl')}{note} | {fwd} | {fb} |")
    if "small_ops" in results:
        print("\n| op | impl | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
        for r in results["small_ops"]:
            if "error" in r:
                print(f"| ERROR {r['error'][:100]} | | | |")
                continue
            fb = f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else ""
            print(f"| {r['op']} | {r['impl']} | {r['fwd_ms']:.4f} | {fb} |")
    if "profile" in results:
        print("\n| kernel (first shape, fwd+bwd) | calls | ms |\n|---|---|---|")
        for r in results["profile"][:12]:
            print(f"| {r['kernel']} | {r['calls_per_step']:.0f} | {r['ms_per_step']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
