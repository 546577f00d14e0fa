"""Compile the chunked gated delta rule kernels for sm_90 without a GPU and report their resources.

    python benchmarks/gdn_compile_report.py [--key-dim 96]

Needs only Triton (no PyTorch, no GPU): the kernel files are loaded by path, so the report can be
made in a virtual environment holding just the Triton version of the GPU machine (e.g. `pip
install triton==3.6.0` for torch 2.11). Arguments are specialised as Triton does at run time for
the 7B layer (pointers and K, V divisible by 16; H and HV not). Prints, per kernel at the
implementation's default launch settings: registers per thread, spill stack and local stores and
loads in the SASS (cuobjdump, bundled with Triton), shared memory, programs per SM that registers
and shared memory allow (228 KB and 64K registers per SM), and the matrix instructions used.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "src", "hybridlm", "ops", "gated_delta_rule", "triton")
DIVISIBLE = {"K", "V", "SQK", "SV"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(KERNELS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(fn, args: dict, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """args: pointer dtypes ("*bf16"), "i32"/"fp32" for scalars, anything else is a constexpr."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = args.get(name)
        if isinstance(value, str) and (value.startswith("*") or value in ("i32", "fp32")):
            signature[name] = value
            if value.startswith("*") or name in DIVISIBLE:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", handle.name], capture_output=True, text=True).stdout
    regs, stack = (int(x) for x in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
    smem = compiled.metadata.shared
    per_sm = min(228 * 1024 // (smem + 1024), 65536 // (num_warps * 32 * regs))
    return {"regs": regs, "stack": stack, "stl": sass.count("STL"), "ldl": sass.count("LDL"), "smem": smem,
            "per_sm": per_sm, "wgmma": sass.count("HGMMA"), "mma": sass.count("HMMA")}


def split_kernels(block_k: int, state_block_vs=(16, 64), one_term: bool = False, state_stages: int = 2,
                  grad_terms: int = 2, f16: bool = False, f16_inverse: bool = False, inverse_diag: int = 16) -> list[tuple]:
    """(label, kernel, args, warps, stages) of "triton-split" at its default settings
    (chunk_split.KernelOptions); the sequential kernels at each V tile of state_block_vs. one_term:
    the opt-in one-term products (`one_term_state_products`, `one_term_output_states`, `one_term_w`);
    f16: the scaled float16 products of the defaults for bf16 inputs with the L2 norm
    (`f16_state_forward`, `f16_state_backward`, `f16_grad_states` with `fuse_qk_norm_backward`);
    f16_inverse: the opt-in `f16_inverse` (with f16); inverse_diag: `KernelOptions.inverse_diag`."""
    terms = 1 if one_term else 2
    k = load("kernels_split")
    raw, half, f32 = "*bf16", "*bf16", "*fp32"
    common = dict(cu_seqlens="*i32", chunk_seq="*i32", chunk_local="*i32", chunk_offsets="*i32", scale="fp32",
                  H="i32", HV="i32", K="i32", V="i32", SQK="i32", SV="i32", BT=64, LOG2_BT=6, BK=block_k, NORM=True)
    runs = []
    for backward in (False, True):
        args = dict(common, q=raw, k=raw, v=raw, g=f32, beta=f32, do=raw if backward else None, w_hi=half, w_lo=half,
                    u=f32, kscale=f32, qscale=f32 if backward else None, t_hi=half if backward else None,
                    t_lo=half if backward else None, dvl=("*fp16" if f16 else f32) if backward else None,
                    dvl_scale=f32 if f16 and backward else None, BV=64, BACKWARD=backward,
                    W_TERMS=terms, w16="*fp16" if f16 else None, k16="*fp16" if f16 else None, F16=f16,
                    q16="*fp16" if f16 and backward else None, F16_Q=f16 and backward, STORE_W=not f16,
                    INV_F16=f16 and f16_inverse, LOG2_DIAG=max(inverse_diag, 1).bit_length() - 1, chunk_offsets="*i32", decay=f32, do16="*fp16" if f16 and backward else None,
                    do_scale=f32 if f16 and backward else None, seq_len="i32", UNIFORM=True,
                    V_LINES=0 if backward else 4, U_T=f16 and not backward)
        runs.append((f"prepare ({'backward' if backward else 'forward'})", k._prepare_kernel, args, 4, 3))
    for block_v in state_block_vs:
        args = dict(common, k=raw, w_hi=half, w_lo=half, u=f32, decay=f32, kscale=f32, h0=None, s_hi=half, s_lo=half,
                    d_hi=half, d_lo=half, ht=None, HAS_H0=False, STORE_HT=False, BV=block_v, S_TERMS=terms,
                    STORE_S_LO=not one_term, W_TERMS=terms, F16=f16, w16="*fp16" if f16 else None,
                    k16="*fp16" if f16 else None, s_scale=f32 if f16 else None, STORE_F16=f16)
        if f16:
            args.update(s_hi="*fp16", s_lo="*fp16")
        runs.append((f"state pass, forward (V tile {block_v})", k._state_fwd_kernel, args, 4, state_stages))
        args = dict(common, q=raw, k=raw, w_hi=half, w_lo=half, decay=f32, kscale=f32, qscale=f32, do=raw,
                    dht=None, ds_hi=half, ds_lo=half, dd_hi=half, dd_lo=half, dh0=None, HAS_DHT=False,
                    STORE_DH0=False, BV=block_v, DD_TERMS=terms, W_TERMS=terms, F16=f16,
                    w16="*fp16" if f16 else None, k16="*fp16" if f16 else None, q16="*fp16" if f16 else None,
                    dvl=("*fp16" if f16 else f32), dvl_scale=f32 if f16 else None, PREP_BV=64,
                    ds_scale=f32 if f16 else None, STORE_F16=f16, do16="*fp16" if f16 else None,
                    do_scale=f32 if f16 else None)
        if f16:
            args.update(ds_hi="*fp16", ds_lo="*fp16")
        runs.append((f"state pass, backward (V tile {block_v})", k._state_bwd_kernel, args, 4, state_stages))
    if f16:  # the forward's pass with a scale per row of S^T (`rows_forward`)
        args = dict(k16="*fp16", w16="*fp16", ut=f32, decay=f32, h0=None, s_hi=half, d16="*fp16", d_scale=f32,
                    ht=None, cu_seqlens="*i32", chunk_offsets="*i32", HV="i32", K="i32", V="i32",
                    BT=64, BK=block_k, BV=64, HAS_H0=False, STORE_HT=False, PREFETCH=True, LATE_STORES=False)
        runs.append(("state pass, forward, rows (V tile 64)", k._state_fwd_rows_kernel, args, 4, state_stages))
        runs.append(("state pass, forward, rows (V tile 128, 8 warps)", k._state_fwd_rows_kernel,
                     dict(args, BV=128, LATE_STORES=True), 8, max(3, state_stages)))
    args = dict(common, q=raw, k=raw, g=f32, s_hi=half, s_lo=half, d_hi="*fp16" if f16 else half,
                d_lo="*fp16" if f16 else half, o=raw, BV=64, OUT_TERMS=1 if f16 else terms,
                d_scale=f32 if f16 else None, D_F16=f16, D_BV=1 if f16 else 32, seq_len="i32", UNIFORM=True)
    runs.append(("output", k._output_kernel, args, 4, 2))
    args = dict(common, q=raw, k=raw, v=raw, g=f32, beta=f32, t_hi=half, t_lo=half, d_hi=half, d_lo=half, dd_hi=half,
                dd_lo=half, do=raw, scratch=f32, dv=raw, dvb_out=f32, dq_part=f32, dk_part=f32, dbeta_part=f32, dgam_part=f32, BV=32, TERMS=grad_terms,
                max_d_out=f32 if f16 else None, max_b_out=f32 if f16 else None, ROWMAX=f16)
    runs.append(("gradients within the chunk", k._grad_local_kernel, args, 4, 3))
    args = dict(common, q=raw, g=f32, s_hi=half, s_lo=half, do=raw, dq_state=f32, dgam_q=f32, BV=32,
                TERMS=grad_terms, s_scale=f32 if f16 else None, F16=f16, S_BV=32)
    if f16:
        args.update(s_hi="*fp16", s_lo="*fp16")
    runs.append(("gradient of q through the states", k._grad_q_kernel, args, 4, 3))
    args = dict(common, q=raw, k=raw, g=f32, beta=f32, s_hi=half, s_lo=half, ds_hi=half,
                ds_lo=half, d_hi=half, d_lo=half, dvb_in=f32, dq_part=f32, dk_part=f32,
                dbeta_part=f32, dgam_part=f32, dq_state=f32, dgam_q=f32, dq_hat=f32, dk_hat=f32, dbeta=f32, dg=f32,
                BV=16, TERMS=grad_terms, s_scale=f32 if f16 else None, ds_scale=f32 if f16 else None, F16=f16,
                S_BV=32, DS_BV=32, max_d=f32 if f16 else None, max_b=f32 if f16 else None, FUSE_NORM=f16)
    if f16:
        args.update(s_hi="*fp16", s_lo="*fp16", ds_hi="*fp16", ds_lo="*fp16", dq_hat=raw, dk_hat=raw)
    runs.append(("gradients through the states", k._grad_state_kernel, args, 4, 3))
    args = dict(q=raw, k=raw, dq_hat=f32, dk_hat=f32, dq=raw, dk=raw, NTOK="i32", H="i32", HV="i32", K="i32",
                SQK="i32", BT=64, BK=block_k, NORM=True)
    runs.append(("L2-norm backward", k._qk_norm_bwd_kernel, args, 4, 3))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-dim", type=int, default=96, help="K (padded to a power of two)")
    parser.add_argument("--state-block-v", type=int, nargs="+", default=[16, 64], help="V tiles of the sequential kernels")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (80: A100, mma.sync)")
    parser.add_argument("--state-stages", type=int, default=2, help="pipelining stages of the sequential kernels")
    parser.add_argument("--grad-terms", type=int, default=2, help="bf16 terms in the gradient kernels' matmuls")
    parser.add_argument("--one-term", action="store_true", help="the opt-in one-term state products and output states")
    parser.add_argument("--f16", action="store_true", help="the float16 state passes (the defaults for bf16 with the L2 norm)")
    parser.add_argument("--f16-inverse", action="store_true", help="with --f16: the opt-in float16 inverse")
    parser.add_argument("--inverse-diag", type=int, default=16, help="KernelOptions.inverse_diag (0: the whole tile)")
    args = parser.parse_args()
    block_k = max(16, triton.next_power_of_2(args.key_dim))
    runs = split_kernels(block_k, args.state_block_v, args.one_term, args.state_stages, args.grad_terms, args.f16,
                         args.f16_inverse, args.inverse_diag)
    print(f'"triton-split", Triton {triton.__version__}, sm_{args.arch}, K tile {block_k}{", one-term" if args.one_term else ""}\n')
    print("| kernel | warps | stages | registers | spill stack B | STL/LDL | shared KB | programs/SM | wgmma/mma |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, fn, kernel_args, warps, stages in runs:
        r = compile_kernel(fn, kernel_args, warps, stages, args.arch)
        print(f"| {label} | {warps} | {stages} | {r['regs']} | {r['stack']} | {r['stl']}/{r['ldl']} | "
              f"{r['smem'] / 1024:.0f} | {r['per_sm']} | {r['wgmma']}/{r['mma']} |", flush=True)


if __name__ == "__main__":
    main()
