"""Host side of the chunked gated delta rule in Triton (kernels in `kernels_split.py`; backend
"triton-split", also "triton").

Same interface and layouts as `gated_delta_rule` (fla's). q, k and v are read in place when their
heads and dims are packed, whatever their token stride (the GDN layer's slices of one q|k|v
tensor; `chunk._token_rows`): the kernels take the token strides as SQK (q and k) and SV (v). Numerics and tiling: every matmul runs
on bf16 tensor cores with float32 operands split into two bf16 terms (about float32 accuracy at
bf16 speed; `kernels_split`'s docstring), except, for bf16 inputs, the states stored for the
output kernel (one term) and, with the q/k L2 norm, the two sequential state passes (scaled
float16 operands, which the gradient and output kernels then also multiply in float16); more
one-term products are opt-in (`KernelOptions`). The backward is split
into kernels whose accumulators fit 4 warps. It recomputes the forward's prepare and state passes
rather than keeping the per-chunk states alive between forward and backward, and on a GPU runs
that recomputing pass on a side stream beside the reverse pass (they do not depend on each other).

Status: the default GPU backend ("triton-split", auto's choice on CUDA). On an H200 with
Triton's wgmma code generation at the launch settings below (the sequential kernels need two
pipelining stages there), the float64 checks give at worst 2.44e-3 with bf16 inputs (no decay,
64K tokens and documents with extreme gates included; the bf16 rounding of the outputs alone is
1.7e-3) and 7.8e-6 with float32 inputs (docs/benchmarks.md, ninth session).

Wrapped as the torch.library custom op `hybridlm::gdn_chunk_split` (`chunk.define_chunk_op`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from hybridlm.ops.gated_delta_rule.triton import kernels_split as kernels
from hybridlm.ops.gated_delta_rule.triton.chunk import call_gdn_op, define_chunk_op
from hybridlm.ops.gated_delta_rule.triton.layout import CHUNK, SequenceLayout


@dataclass
class KernelOptions:
    """Launch settings (module-wide; benchmarks may change them, models should not).

    state_fwd_block_v / state_bwd_block_v: V tile of the two sequential kernels (0: chosen from the
    number of programs, `_state_block_v`). *_block_v: V tile of the loops in the parallel kernels.
    warps_*: warps per program (4 for the kernels whose matmuls have 64 rows: with 8, Triton gives
    chained 64-row matmuls all 8 warps along the rows, which duplicates their accumulators).
    stages_*: software-pipelining depth. The defaults are the fastest settings measured on an H200
    at (1, 8192, 30, 96, 192) (docs/benchmarks.md).

    stages_state (0: 2 with wgmma, 1 with mma.sync) must be >= 2 with wgmma (Hopper): Triton 3.6
    builds the sequential kernels at one stage so that they read shared memory out of bounds (V tile
    16: illegal memory access, caught by compute-sanitizer in `_state_fwd_kernel`'s first matmul) or
    compute wrong states without a fault (V tile 32); `_state_stages` enforces it. With mma.sync
    (before Hopper, or DISABLE_MMA_V3=1) a second stage only adds spills, and the sequential kernels'
    V tile stays <= 32: at 64 the reverse pass spills 13 KB (offline sm_80 compile,
    benchmarks/gdn_compile_report.py --arch 80), which made a fwd+bwd at the 7B layer take
    37.5 ms instead of 7.9 (H200 with DISABLE_MMA_V3=1).
    """

    state_fwd_block_v: int = 0
    state_bwd_block_v: int = 0
    stages_state: int = 0
    warps_state: int = 4
    prepare_block_v: int = 64
    stages_prepare: int = 3
    warps_prepare: int = 4
    output_block_v: int = 64
    stages_output: int = 2
    warps_output: int = 4
    grad_local_block_v: int = 32
    stages_grad_local: int = 3
    grad_state_block_v: int = 16
    stages_grad_state: int = 3
    grad_q_block_v: int = 32
    stages_grad_q: int = 3
    warps_grad_local: int = 4
    warps_grad_state: int = 4
    # One bf16 term instead of two, for bf16 inputs only (float32 and float16 inputs keep both).
    # Default: the chunk-entry states the forward stores for the output kernel (o moves from 1.7e-3
    # to at most 2.4e-3 against float64, nothing else changes: the backward recomputes the states).
    # Opt-in (faster, less exact): S in the forward pass's W S and dDelta in the reverse pass's
    # W^T dDelta (`one_term_state_products`), W in both passes (`one_term_w`). With both, fwd+bwd at
    # the 7B layer takes 4.45 instead of 5.77 ms on an H200 and the float64 checks with the model's
    # gates pass at 2.4e-3, but with no decay (g = 0) the errors accumulate over the sequence:
    # dg 5.9e-3 and dk 4.8e-3 at K = V = 64 (tests/ops, CPU), over the 5e-3 bar; S alone gives dg
    # 4.0e-3 there. docs/benchmarks.md has the numbers.
    one_term_state_products: bool = False
    one_term_w: bool = False
    one_term_output_states: bool = True
    # Opt-in, bf16 inputs only: one bf16 term of Delta, dDelta, S, dS and the computed operands in
    # the gradient kernels' matmuls (T keeps two). Measured on an H200 with the two options above
    # on: fwd+bwd 4.13 instead of 4.45 ms at the 7B layer, but the float64 checks' worst error
    # rises to 4.1e-3 (dk, dg) with the model's gates, too close to the 5e-3 bar for a default.
    one_term_grads: bool = False
    # Default, bf16 inputs with the q/k L2 norm only: the forward state pass multiplies float16
    # operands, one term each (S and Delta scaled by a power of two per tile): 2 matmuls a step
    # instead of 5; the one-term options above then act on the reverse pass only. Measured on an
    # H200: fwd+bwd 4.94 instead of 5.43 ms at the 7B layer; the float64 checks' worst error
    # 2.42e-3 (no decay and 32K tokens included; 2.35e-3 with two bf16 terms).
    f16_state_forward: bool = True
    # Default, same inputs: the reverse state pass multiplies float16 operands likewise (dS, dO and
    # dDelta scaled per tile): 3 matmuls a step instead of 7. Measured on an H200 at the 7B layer,
    # passes in order at V tile 64: the reverse pass 1.09 -> 1.03 ms (it is latency-bound). P^T dO
    # comes in float16 too (scaled per tile), so that two reverse programs of V tile 32 fit an SM:
    # fwd+bwd at the three shapes 4.08 / 4.19 / 3.47 -> 4.05 / 4.02 / 3.17 ms.
    f16_state_backward: bool = True
    # Opt-in, same inputs: the prepare kernel's triangular inverse T = (I + A)^-1 with float16
    # products (10 matmuls a chunk instead of 30), in the forward and the backward alike. Measured
    # on an H200 at the 7B layer: the two prepare launches 0.811 -> 0.782 ms (< 1% of fwd+bwd);
    # with one key repeated at beta 1.999, dg's error against float64 rises from 1.0e-3 to 3.5e-3
    # and dbeta's from 1.1e-3 to 3.3e-3 (CPU, K = V = 32, T = 200). Not worth that as a default.
    f16_inverse: bool = False
    # The backward's two sequential passes (the recomputing forward one and the reverse one) on two
    # CUDA streams at once: each alone leaves most of the GPU idle. Measured on an H200 at the 7B
    # layer: fwd+bwd 4.46 -> 4.23 ms, 4.05 with the reverse pass at V tile 32 (`_state_block_v`);
    # outputs and gradients bitwise equal to the passes in order.
    concurrent_state_passes: bool = True
    # Default, with both float16 state passes: the passes store S and dS as they multiply them
    # (float16, a power-of-two scale per V tile) instead of two bf16 terms, and `_grad_q_kernel`
    # and `_grad_state_kernel` take one float16 term per operand (dO, Delta, dVb scaled per row).
    # Measured on an H200 at the 7B layer (eighth session): fwd+bwd 4.01 -> 3.86 ms, both passes
    # faster (fewer stores) and the gradient kernel 0.92 -> 0.79 ms; float64 checks unchanged.
    f16_grad_states: bool = True
    # With one value head per q/k head (HV == H), the gradient kernel through the states goes back
    # through the q/k L2 norms itself and stores dq, dk (no float32 dq_hat, dk_hat round trip):
    # fwd+bwd 4.07 -> 4.00 ms at the 7B layer.
    fuse_qk_norm_backward: bool = True
    # Default, with the float16 forward state pass: in the forward, the pass stores Delta as it
    # multiplies it (float16, a power-of-two scale per V tile) and the output kernel multiplies
    # P Delta in float16 (P is bounded by the scale with the L2 norm): one matmul instead of three,
    # 72 instead of 120 KB of shared memory. Forward 0.86 -> 0.79 ms at the 7B layer; o's error
    # against float64 moves by about 3e-5.
    f16_output_delta: bool = True
    # Default, with the float16 forward state pass, in the forward only: the pass carries S^T with
    # a power-of-two scale per row (`_state_fwd_rows_kernel`), so that its scales need no reduction
    # across warps and its float16 operands enter the matmuls from registers. rows_block_v: its V
    # tile (0: `_rows_block_v` chooses 64, the rows of one warpgroup's matmul, V rounded up to a
    # power of two below that, or 128 with 8 warps where that halves the reads through L2).
    # That pass asks L2 for the next chunk's tiles at the start of each step (l2_prefetch): Triton
    # issues the two-stage pipeline's loads only at the end of the step before. Measured on an H200
    # at the 7B layer: the pass 0.315-0.34 -> 0.27 ms, the forward 0.758 -> 0.707 ms (with
    # stages_prepare 3); outputs unchanged (bitwise under the interpreter). The prefetch in the
    # backward's two concurrent passes made them slower (0.452 -> 0.591 ms), so it is not there.
    rows_forward: bool = True
    rows_block_v: int = 0
    l2_prefetch: bool = True
    # rows_late_stores: that pass stores S and Delta after issuing the matmul that follows them,
    # instead of before, where their layout conversions held the step up. Measured on an H200 (GPU
    # time under CUDA-graph replay): 0.665 -> 0.650 ms forward at the 7B layer (90 programs, one per
    # SM), but 0.626 -> 0.628 and 0.514 -> 0.516 at the other two shapes (192 and 256
    # programs, where a second program on the SM fills those stalls). None: on when every program
    # has an SM to itself.
    rows_late_stores: bool | None = None
    # Batches of equal-length sequences: the per-chunk prepare and output kernels compute where
    # their chunk sits from the slot index (`SequenceLayout.uniform_len`) instead of reading it
    # through two dependent loads before the chunk's own. The forward prepare kernel also asks L2
    # for v as it starts (it reads v last, after the triangular inverse): prepare_prefetch_v.
    # Measured on an H200 with CUDA-graph replay at the three issue shapes: the prepare kernel
    # 0.269 -> 0.250 ms (uniform_slots) -> 0.247 (both) at the 7B layer; the forward
    # 0.69 / 0.65 / 0.54 -> 0.67 / 0.63 / 0.52 ms.
    uniform_slots: bool = True
    prepare_prefetch_v: bool = True
    # inverse_diag: the triangular inverse's first levels (blocks up to this size) run on the
    # diagonal blocks only, as a batch of small matmuls, instead of on the whole 64 x 64 tile where
    # the products are zero outside those blocks (`_unit_lower_inverse`); 0 or 1: the whole tile.
    # At 16: 12 wgmma matmuls a chunk instead of 30. Measured on an H200 (GPU time, CUDA-graph
    # replay): the forward prepare kernel 0.247 / 0.264 / 0.243 -> 0.227 / 0.235 / 0.208 ms at the
    # issue's three shapes, the forward 0.654 / 0.631 / 0.501 -> 0.632 / 0.603 / 0.467, fwd+bwd
    # 3.13 / 3.20 / 2.64 -> 3.08 / 3.15 / 2.58. At 32 (a [2, 32, 32] batch) the kernel spills
    # (208 B) and the prepare took 0.289 ms at the 7B layer.
    inverse_diag: int = 16


SPLIT_OPTIONS = KernelOptions()


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream the backward's recomputing forward state pass runs on (None: run it in order, on
    CPU or with `concurrent_state_passes` off)."""
    if device.type != "cuda" or not SPLIT_OPTIONS.concurrent_state_passes:
        return None
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def uses_wgmma(device: torch.device) -> bool:
    """Whether Triton compiles our matmuls to wgmma here (Hopper and newer, unless DISABLE_MMA_V3=1)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and os.environ.get("DISABLE_MMA_V3") != "1")


def _state_stages(device: torch.device) -> int:
    """Pipelining depth of the sequential kernels: at least 2 where wgmma is used (KernelOptions)."""
    stages = SPLIT_OPTIONS.stages_state
    if uses_wgmma(device):
        return max(stages, 2)
    return stages or 1


def _terms(option: str, x: torch.Tensor) -> int:
    """bf16 terms of the operands a one_term_* option covers: 1 where it is on and x is bf16, else 2."""
    return 1 if getattr(SPLIT_OPTIONS, option) and x.dtype == torch.bfloat16 else 2


def _state_terms(k: torch.Tensor) -> int:
    """bf16 terms of S in W S (forward pass) and of dDelta in W^T dDelta (reverse pass)."""
    return _terms("one_term_state_products", k)


def _w_terms(k: torch.Tensor) -> int:
    """bf16 terms of W in the state passes."""
    return _terms("one_term_w", k)


def _grad_terms(q: torch.Tensor) -> int:
    """bf16 terms of the float32 operands in the gradient kernels' matmuls."""
    return _terms("one_term_grads", q)


def _f16_state_forward(k: torch.Tensor, norm: bool) -> bool:
    """Whether the forward state pass multiplies float16 operands (bf16 inputs, with the L2 norm)."""
    return SPLIT_OPTIONS.f16_state_forward and norm and k.dtype == torch.bfloat16


def _f16_state_backward(k: torch.Tensor, norm: bool) -> bool:
    """Whether the reverse state pass multiplies float16 operands (bf16 inputs, with the L2 norm)."""
    return SPLIT_OPTIONS.f16_state_backward and norm and k.dtype == torch.bfloat16


def _f16_grads(k: torch.Tensor, norm: bool) -> bool:
    """Whether the gradient kernel reads the states in float16 as both float16 passes multiplied them."""
    return SPLIT_OPTIONS.f16_grad_states and _f16_state_forward(k, norm) and _f16_state_backward(k, norm)


def _f16_inverse(k: torch.Tensor, norm: bool) -> bool:
    """Whether the prepare kernel inverts with float16 products (bf16 inputs, with the L2 norm)."""
    return SPLIT_OPTIONS.f16_inverse and norm and k.dtype == torch.bfloat16


def _one_term_states(k: torch.Tensor) -> bool:
    """Whether the sequential kernels run with one-term products (their shared memory, `_per_sm`)."""
    return _state_terms(k) == 1 and _w_terms(k) == 1


def _output_terms(q: torch.Tensor) -> int:
    """bf16 terms of the chunk-entry states the forward stores for the output kernel."""
    return _terms("one_term_output_states", q)


# Programs of each sequential kernel one SM holds (benchmarks/gdn_compile_report.py, Triton 3.6,
# K tile 128): with wgmma at 2 stages, by shared memory: one-term products (bf16 inputs) forward
# 74 / 84 / 104 KB at V tiles 16 / 32 / 64, reverse 112 / 128 / 160 KB; the float16 forward pass
# (one term too) 72 / 80 / 96 KB, the float16 reverse pass 104 / 112 / 128 KB; two terms forward
# 110 KB at V tile 16, everything else 124-193 KB. With mma.sync at one stage, registers allow two.
def _per_sm(backward: bool, block_v: int, wgmma: bool, one_term: bool, f16: bool = False) -> int:
    if not wgmma:
        return 2
    if f16 and backward:
        return {16: 2, 32: 2, 64: 1}[block_v]
    if one_term:
        return {16: 2, 32: 1, 64: 1}[block_v] if backward else {16: 3, 32: 2, 64: 2}[block_v]
    return 2 if not backward and block_v == 16 else 1


def _block_k(key_dim: int) -> int:
    block_k = max(16, triton.next_power_of_2(key_dim))
    if block_k > 256:
        raise ValueError(f"the Triton gated delta rule supports key head dims up to 256; got K={key_dim}")
    return block_k


def _state_block_v(value_dim: int, programs_per_tile: int, device: torch.device, backward: bool,
                   one_term: bool = False, concurrent: bool = False, f16: bool = False) -> int:
    """V tile of a sequential kernel, which runs one program per (sequence, value head, V tile)
    through all the chunks: the smallest tile (more, shorter programs hide more latency) whose
    programs all run at once at no more than two per SM (three forward programs of V tile 16 per SM
    measured slower than two of 32 at the 7B layer), else the largest (fewest waves).
    concurrent: the reverse pass shares the GPU with the recomputing forward pass
    (`concurrent_state_passes`); V tile 32 then, the fastest fwd+bwd of 16 / 32 / 64 at the 7B
    layer on an H200 (4.36 / 4.05 / 4.23 ms) and within noise of the best at the issue's other
    two shapes (docs/benchmarks.md). f16: the float16 reverse pass (its shared memory, `_per_sm`)."""
    option = SPLIT_OPTIONS.state_bwd_block_v if backward else SPLIT_OPTIONS.state_fwd_block_v
    if option:
        return option
    wgmma = uses_wgmma(device)
    largest = min(64 if wgmma else 32, max(16, triton.next_power_of_2(value_dim)))
    if backward and concurrent:
        return min(32, largest)
    sms = _sm_count(device)
    block_v = 16
    while block_v < largest and (programs_per_tile * triton.cdiv(value_dim, block_v)
                                 > sms * min(2, _per_sm(backward, block_v, wgmma, one_term, f16))):
        block_v *= 2
    return block_v


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _v_tile(option: int, value_dim: int) -> int:
    return min(option, max(16, triton.next_power_of_2(value_dim)))


def _log2_diag(size: int) -> int:
    """The prepare kernel's LOG2_DIAG for `KernelOptions.inverse_diag`."""
    if size <= 1:
        return 0
    if size & (size - 1) or not 16 <= size <= CHUNK // 2:  # tl.dot takes no dimension under 16
        raise ValueError(f"inverse_diag must be 0, 1 or a power of two from 16 to {CHUNK // 2}, got {size}")
    return size.bit_length() - 1


def _split_buffer(like: torch.Tensor, *shape: int, terms: int = 2) -> torch.Tensor:
    """[2, *shape] bf16: the hi and lo halves of a float32 buffer stored as a two-term bf16 split
    ([1, *shape]: the hi half only)."""
    return like.new_empty(terms, *shape, dtype=torch.bfloat16)


def _prepare(q, k, v, g, beta, do, scale, layout: SequenceLayout, norm: bool, block_k: int, u_t: bool = False):
    """W (split), U, kscale, the decays e^gamma_C per chunk; with do (backward) also T (split),
    qscale and P^T dO (with the reverse pass's float16 products: P^T dO and dO in float16 with their
    scales per tile, and the V tile; else P^T dO float32, three None and the V tile); and f16, the
    float16 operands of the float16 state passes, (W, kscale * k, qscale * q for the reverse pass
    or None), or None. W is None when only the float16 passes read it. u_t (forward only): U
    transposed per chunk, [num_slots, HV, V, C], for `_state_forward_rows`."""
    ntok, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[1], v.shape[2]
    backward = do is not None
    f16_fwd = _f16_state_forward(k, norm)
    f16_bwd = backward and _f16_state_backward(k, norm)
    f16 = None
    if f16_fwd or f16_bwd:
        f16 = tuple(q.new_empty(3 if f16_bwd else 2, ntok, value_heads, key_dim, dtype=torch.float16))
        f16 += (None,) * (3 - len(f16))
    w = None if f16_fwd and (f16_bwd or not backward) else _split_buffer(q, ntok, value_heads, key_dim, terms=_w_terms(k))
    if u_t:
        u = q.new_empty(layout.num_slots, value_heads, value_dim, CHUNK, dtype=torch.float32)
    else:
        u = q.new_empty(ntok, value_heads, value_dim, dtype=torch.float32)
    kscale = q.new_empty(ntok, value_heads, dtype=torch.float32)
    qscale = torch.empty_like(kscale) if backward else None
    tmat = _split_buffer(q, ntok, value_heads, CHUNK) if backward else None
    prep_v = _v_tile(SPLIT_OPTIONS.prepare_block_v, value_dim)
    dvl = dvl_scale = None
    if backward:
        dvl = torch.empty_like(u, dtype=torch.float16 if f16_bwd else torch.float32)
    do16 = do_scale = None
    if f16_bwd:
        dvl_scale = q.new_empty(layout.num_slots, value_heads, triton.cdiv(value_dim, prep_v), dtype=torch.float32)
        do16 = torch.empty_like(dvl)
        do_scale = torch.empty_like(dvl_scale)
    decay = q.new_empty(layout.num_slots, value_heads, dtype=torch.float32)  # e^gamma_C per chunk
    kernels._prepare_kernel[(layout.num_slots, value_heads)](
        q, k, v, g, beta, do,
        None if w is None else w[0], None if w is None else w[-1], u, kscale, qscale,
        None if tmat is None else tmat[0], None if tmat is None else tmat[1], dvl,
        *(f16 or (None,) * 3), dvl_scale,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local,
        scale, heads, value_heads, key_dim, value_dim, q.stride(0), v.stride(0),
        BT=CHUNK, LOG2_BT=6, BK=block_k, BV=prep_v, NORM=norm, BACKWARD=backward,
        W_TERMS=_w_terms(k), STORE_W=w is not None, F16=f16 is not None, F16_Q=f16_bwd,
        INV_F16=_f16_inverse(k, norm), chunk_offsets=layout.chunk_offsets, decay=decay, do16=do16, do_scale=do_scale,
        U_T=u_t, seq_len=layout.uniform_len,
        UNIFORM=layout.uniform_len > 0 and SPLIT_OPTIONS.uniform_slots,
        V_LINES=triton.next_power_of_2(triton.cdiv(value_dim, 64)) if SPLIT_OPTIONS.prepare_prefetch_v and not backward else 0,
        LOG2_DIAG=_log2_diag(SPLIT_OPTIONS.inverse_diag),
        num_warps=SPLIT_OPTIONS.warps_prepare, num_stages=SPLIT_OPTIONS.stages_prepare,
    )
    return w, u, kscale, decay, qscale, tmat, (dvl, dvl_scale, do16, do_scale, prep_v), f16


def _state_forward(k, w, u, kscale, decay, initial_state, output_final_state, layout, block_k, state_terms=2,
                   f16=None, f16_states=False, f16_delta=False):
    """Chunk-entry states [state_terms, NCHUNK, HV, K, V], Delta [2, NTOK, HV, V] (split), the final
    state, and (the states' scales, Delta's scales, the pass's V tile). With f16_states / f16_delta
    (float16 pass only) the states / Delta are float16, [1, NCHUNK, HV, K, V] / [1, NTOK, HV, V],
    with scales [NCHUNK, HV, V tiles]; otherwise those scales are None."""
    ntok, value_heads, value_dim = u.shape
    key_dim = k.shape[2]
    state_v = _state_block_v(value_dim, layout.num_seqs * value_heads, k.device, backward=False,
                             one_term=_one_term_states(k) or f16 is not None)
    # num_slots >= chunks
    s_scale = None
    if f16_states:
        states = u.new_empty(1, layout.num_slots, value_heads, key_dim, value_dim, dtype=torch.float16)
        s_scale = u.new_empty(layout.num_slots, value_heads, triton.cdiv(value_dim, state_v))
    else:
        states = _split_buffer(u, layout.num_slots, value_heads, key_dim, value_dim, terms=state_terms)
    d_scale = None
    if f16_delta:
        vnew = u.new_empty(1, ntok, value_heads, value_dim, dtype=torch.float16)
        d_scale = u.new_empty(layout.num_slots, value_heads, triton.cdiv(value_dim, state_v))
    else:
        vnew = _split_buffer(u, ntok, value_heads, value_dim)
    final = None
    if output_final_state:
        final = u.new_empty(layout.num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    kernels._state_fwd_kernel[(layout.num_seqs, value_heads, triton.cdiv(value_dim, state_v))](
        k, None if w is None else w[0], None if w is None else w[-1], u, decay, kscale, initial_state,
        states[0], states[-1], vnew[0], vnew[-1], final,
        None if f16 is None else f16[0], None if f16 is None else f16[1],
        layout.cu_seqlens, layout.chunk_offsets,
        k.shape[1], value_heads, key_dim, value_dim, k.stride(0), u.stride(0),
        BT=CHUNK, BK=block_k, BV=state_v,
        HAS_H0=initial_state is not None, STORE_HT=output_final_state, S_TERMS=_state_terms(k),
        STORE_S_LO=state_terms == 2, W_TERMS=_w_terms(k), F16=f16 is not None,
        s_scale=s_scale, STORE_F16=f16_states, d_scale=d_scale, D_F16=f16_delta,
        num_warps=SPLIT_OPTIONS.warps_state, num_stages=_state_stages(k.device),
    )
    return states, vnew, final, (s_scale, d_scale, state_v)


def _rows_block_v(value_dim: int, programs_per_tile: int = 1, device: torch.device | None = None) -> int:
    """V tile of `_state_fwd_rows_kernel` (KernelOptions.rows_block_v; 0: this choice): 64 (one
    warpgroup's matmul rows), or V rounded up to a power of two below that; 128 (two warpgroups, 8
    warps) with wgmma when V is a multiple of 128 and tiles of 64 would put more than one program on
    an SM: both warpgroups then share the chunk's W and k tiles, which halves the pass's reads
    through L2 (at two programs per SM it ran at 90% of L2 throughput). Measured on an H200 at
    (8, 2048, 16, 128, 128) with CUDA-graph replay: the pass 0.141 -> 0.131 ms at V tile 128, 0.124
    with 3 pipeline stages (`_rows_launch`); at (1, 8192, 30, 96, 192) a V tile of 128 (two tiles,
    one a third empty) took 0.387 ms instead of 0.253."""
    if SPLIT_OPTIONS.rows_block_v:
        return SPLIT_OPTIONS.rows_block_v
    block_v = min(64, max(16, triton.next_power_of_2(value_dim)))
    if (block_v == 64 and value_dim % 128 == 0 and device is not None and uses_wgmma(device)
            and programs_per_tile * triton.cdiv(value_dim, 64) > _sm_count(device)):
        block_v = 128
    return block_v


def _rows_launch(block_v: int, device: torch.device) -> tuple[int, int]:
    """(warps, pipeline stages) of `_state_fwd_rows_kernel` at V tile block_v: a warpgroup per 64
    rows of S^T; 3 stages at V tile 128 (one program per SM, whose shared memory allows them)."""
    if block_v == 128 and uses_wgmma(device):
        return 8, max(3, SPLIT_OPTIONS.stages_state)
    return SPLIT_OPTIONS.warps_state, _state_stages(device)


def _state_forward_rows(k, u, decay, f16, initial_state, output_final_state, layout, block_k):
    """The forward pass carried as S^T with a scale per row: the chunk-entry states [1, NCHUNK, HV,
    K, V] (one bf16 term), Delta [1, NTOK, HV, V] float16 with its scales per value column
    [NCHUNK, HV, V], and the final state or None."""
    value_heads, value_dim = u.shape[1], u.shape[2]
    key_dim = k.shape[2]
    block_v = _rows_block_v(value_dim, layout.num_seqs * value_heads, k.device)
    warps, stages = _rows_launch(block_v, k.device)
    grid = (layout.num_seqs, value_heads, triton.cdiv(value_dim, block_v))
    late = SPLIT_OPTIONS.rows_late_stores
    if late is None:  # alone on its SM, a program has no other warps to fill its stalls with
        late = k.device.type == "cuda" and grid[0] * grid[1] * grid[2] <= _sm_count(k.device)
    states = _split_buffer(k, layout.num_slots, value_heads, key_dim, value_dim, terms=1)
    vnew = k.new_empty(1, k.shape[0], value_heads, value_dim, dtype=torch.float16)
    d_scale = u.new_empty(layout.num_slots, value_heads, value_dim)
    final = None
    if output_final_state:
        final = u.new_empty(layout.num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    kernels._state_fwd_rows_kernel[grid](
        f16[1], f16[0], u, decay, initial_state, states[0], vnew[0], d_scale, final,
        layout.cu_seqlens, layout.chunk_offsets,
        value_heads, key_dim, value_dim,
        BT=CHUNK, BK=block_k, BV=block_v, HAS_H0=initial_state is not None, STORE_HT=output_final_state,
        PREFETCH=SPLIT_OPTIONS.l2_prefetch, LATE_STORES=late,
        num_warps=warps, num_stages=stages,
    )
    return states, vnew, final, d_scale


def _forward(q, k, v, g, beta, scale, initial_state, output_final_state, layout: SequenceLayout, norm: bool):
    """Flattened inputs [NTOK, H, K], [NTOK, HV, V], [NTOK, HV] -> (o [NTOK, HV, V], final or None)."""
    heads, key_dim = q.shape[1], q.shape[2]
    value_heads, value_dim = v.shape[1], v.shape[2]
    block_k = _block_k(key_dim)
    rows = SPLIT_OPTIONS.rows_forward and _f16_state_forward(k, norm)
    w, u, kscale, decay, _, _, _, f16 = _prepare(q, k, v, g, beta, None, scale, layout, norm, block_k, u_t=rows)
    if rows:  # one bf16 term of S, float16 Delta with a scale per column
        out_terms, f16_delta, state_v = 1, True, 1
        states, vnew, final, d_scale = _state_forward_rows(
            k, u, decay, f16, initial_state, output_final_state, layout, block_k)
    else:
        out_terms = _output_terms(q)
        f16_delta = f16 is not None and SPLIT_OPTIONS.f16_output_delta
        states, vnew, final, (_, d_scale, state_v) = _state_forward(
            k, w, u, kscale, decay, initial_state, output_final_state, layout, block_k, state_terms=out_terms,
            f16=f16, f16_delta=f16_delta)
    del w, u, kscale, decay, f16
    o = v.new_empty(v.shape, dtype=q.dtype)
    kernels._output_kernel[(layout.num_slots, value_heads)](
        q, k, g, states[0], states[-1], vnew[0], vnew[-1], o,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local, layout.chunk_offsets,
        scale, heads, value_heads, key_dim, value_dim, q.stride(0), v.stride(0),
        BT=CHUNK, BK=block_k, BV=_v_tile(SPLIT_OPTIONS.output_block_v, value_dim), NORM=norm, OUT_TERMS=out_terms,
        d_scale=d_scale, D_F16=f16_delta, D_BV=state_v, seq_len=layout.uniform_len,
        UNIFORM=layout.uniform_len > 0 and SPLIT_OPTIONS.uniform_slots,
        num_warps=SPLIT_OPTIONS.warps_output, num_stages=SPLIT_OPTIONS.stages_output,
    )
    return o, final


def _backward(q, k, v, g, beta, scale, initial_state, layout: SequenceLayout, norm: bool, do, dht):
    """Gradients (dq, dk, dv in the inputs' dtypes; dg, dbeta float32; dh0 float32 or None)."""
    ntok, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[1], v.shape[2]
    block_k = _block_k(key_dim)
    w, u, kscale, decay, qscale, tmat, (dvl, dvl_scale, do16, do_scale, prep_v), f16 = _prepare(
        q, k, v, g, beta, do, scale, layout, norm, block_k)
    # The two sequential passes do not depend on each other (the reverse pass needs no forward
    # state): on a GPU the recomputing forward pass runs on a side stream, beside the reverse pass,
    # and `_grad_q_kernel` follows it there. The main stream waits for the forward pass before
    # `_grad_local_kernel` (Delta) and for `_grad_q_kernel` before `_grad_state_kernel`.
    side = _side_stream(q.device)
    if side is not None:
        main = torch.cuda.current_stream(q.device)
        side.wait_stream(main)
    f16_grads = _f16_grads(k, norm)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        states, vnew, _, (s_scale, _, s_block_v) = _state_forward(
            k, w, u, kscale, decay, initial_state, False, layout, block_k,
            f16=f16 if _f16_state_forward(k, norm) else None, f16_states=f16_grads)
        states_done = torch.cuda.Event() if side is not None else None
        if side is not None:
            states_done.record(side)
        # The gradient of q through the states needs only them and dO.
        dq_state = q.new_empty(ntok, value_heads, key_dim, dtype=torch.float32)
        dgam_q = q.new_empty(ntok, value_heads, dtype=torch.float32)
        grad_q_v = _v_tile(SPLIT_OPTIONS.grad_q_block_v, value_dim)
        kernels._grad_q_kernel[(layout.num_slots, value_heads)](
            q, g, states[0], states[-1], do, dq_state, dgam_q,
            layout.cu_seqlens, layout.chunk_seq, layout.chunk_local, layout.chunk_offsets,
            scale, heads, value_heads, key_dim, value_dim, q.stride(0),
            BT=CHUNK, BK=block_k, BV=min(grad_q_v, s_block_v) if f16_grads else grad_q_v, NORM=norm,
            TERMS=_grad_terms(q), s_scale=s_scale, F16=f16_grads, S_BV=s_block_v,
            num_warps=4, num_stages=SPLIT_OPTIONS.stages_grad_q,
        )
    if side is not None:
        # No block one stream still uses may be handed to the other before that use is done.
        for x in (q, k, w, u, g, kscale, decay, initial_state, do, *(f16 or ()), *layout.tensors()):
            if x is not None:
                x.record_stream(side)
        for x in (states, vnew, s_scale, dq_state, dgam_q):
            if x is not None:
                x.record_stream(main)
    f16_bwd = _f16_state_backward(k, norm)
    state_v = _state_block_v(value_dim, layout.num_seqs * value_heads, q.device, backward=True,
                             one_term=_one_term_states(k) or f16_bwd, concurrent=side is not None, f16=f16_bwd)
    del u
    ds_scale = None
    if f16_grads:
        dstates = q.new_empty(1, layout.num_slots, value_heads, key_dim, value_dim, dtype=torch.float16)
        ds_scale = q.new_empty(layout.num_slots, value_heads, triton.cdiv(value_dim, state_v), dtype=torch.float32)
    else:
        dstates = _split_buffer(q, layout.num_slots, value_heads, key_dim, value_dim)
    dvnew = torch.empty_like(vnew)
    dh0 = None
    if initial_state is not None:
        dh0 = q.new_empty(layout.num_seqs, value_heads, key_dim, value_dim, dtype=torch.float32)
    kernels._state_bwd_kernel[(layout.num_seqs, value_heads, triton.cdiv(value_dim, state_v))](
        q, k, None if w is None else w[0], None if w is None else w[-1], decay, kscale, qscale, do, dvl, dht,
        dstates[0], dstates[-1], dvnew[0], dvnew[1], dh0,
        *(f16 if f16_bwd else (None,) * 3), dvl_scale,
        layout.cu_seqlens, layout.chunk_offsets,
        heads, value_heads, key_dim, value_dim, q.stride(0), v.stride(0),
        BT=CHUNK, BK=block_k, BV=state_v,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, DD_TERMS=_state_terms(k),
        W_TERMS=2 if w is None else w.shape[0], F16=f16_bwd, PREP_BV=prep_v,
        ds_scale=ds_scale, STORE_F16=f16_grads, do16=do16, do_scale=do_scale,
        num_warps=SPLIT_OPTIONS.warps_state, num_stages=_state_stages(q.device),
    )
    del w, kscale, decay, qscale, dvl, dvl_scale, do16, do_scale, f16
    if side is not None:
        main.wait_event(states_done)
    grid = (layout.num_slots, value_heads)
    dq_hat = q.new_empty(ntok, value_heads, key_dim, dtype=torch.float32)
    dk_hat = torch.empty_like(dq_hat)
    dbeta = q.new_empty(ntok, value_heads, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    dv = v.new_empty(v.shape)
    scratch = q.new_empty(layout.num_slots, value_heads, CHUNK, CHUNK, dtype=torch.float32)
    dvb = q.new_empty(ntok, value_heads, value_dim, dtype=torch.float32)  # T^T dDelta
    # The largest |entry| of each row of Delta and dVb, for the float16 gradient kernel's scales.
    rowmax = q.new_empty(2, ntok, value_heads, dtype=torch.float32) if f16_grads else (None,) * 2
    # The parts go to dq_hat, dk_hat, dbeta and dg; _grad_state_kernel adds to them in place
    # (each program reads its tiles before writing them).
    kernels._grad_local_kernel[grid](
        q, k, v, g, beta, tmat[0], tmat[1], vnew[0], vnew[1], dvnew[0], dvnew[1], do, scratch,
        dv, dvb, dq_hat, dk_hat, dbeta, dg,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local,
        scale, heads, value_heads, key_dim, value_dim, q.stride(0), v.stride(0),
        BT=CHUNK, BK=block_k, BV=_v_tile(SPLIT_OPTIONS.grad_local_block_v, value_dim), NORM=norm,
        TERMS=_grad_terms(q), max_d_out=rowmax[0], max_b_out=rowmax[1], ROWMAX=f16_grads,
        num_warps=SPLIT_OPTIONS.warps_grad_local, num_stages=SPLIT_OPTIONS.stages_grad_local,
    )
    del scratch, tmat, dvnew
    # With one value head per q/k head the gradient kernel goes back through the norms itself.
    fuse_norm = SPLIT_OPTIONS.fuse_qk_norm_backward and value_heads == heads
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    grad_v = _v_tile(SPLIT_OPTIONS.grad_state_block_v, value_dim)
    if f16_grads:
        grad_v = min(grad_v, s_block_v, state_v)  # inside one scale tile of each pass
    if side is not None:
        main.wait_stream(side)  # _grad_q_kernel
    kernels._grad_state_kernel[grid](
        q, k, g, beta, states[0], states[-1], dstates[0], dstates[-1],
        vnew[0], vnew[1], dvb, dq_hat, dk_hat, dbeta, dg, dq_state, dgam_q,
        dq if fuse_norm else dq_hat, dk if fuse_norm else dk_hat, dbeta, dg,
        layout.cu_seqlens, layout.chunk_seq, layout.chunk_local, layout.chunk_offsets,
        scale, heads, value_heads, key_dim, value_dim, q.stride(0), v.stride(0),
        BT=CHUNK, BK=block_k, BV=grad_v, NORM=norm,
        TERMS=_grad_terms(q), s_scale=s_scale, ds_scale=ds_scale, max_d=rowmax[0], max_b=rowmax[1], F16=f16_grads,
        S_BV=s_block_v, DS_BV=state_v, FUSE_NORM=fuse_norm,
        num_warps=SPLIT_OPTIONS.warps_grad_state, num_stages=SPLIT_OPTIONS.stages_grad_state,
    )
    del states, dstates, vnew, dvb, s_scale, ds_scale, rowmax, dq_state, dgam_q
    if not fuse_norm:
        kernels._qk_norm_bwd_kernel[(triton.cdiv(ntok, CHUNK), heads)](
            q, k, dq_hat, dk_hat, dq, dk,
            ntok, heads, value_heads, key_dim, q.stride(0),
            BT=CHUNK, BK=block_k, NORM=norm,
            num_warps=4,
        )
    return dq, dk, dv, dg, dbeta, dh0


_gdn_chunk = define_chunk_op("gdn_chunk_split", _forward, _backward)


def chunk_gated_delta_rule_triton_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in Triton with split-bf16 matmuls, differentiable (fla layouts).

    q, k: [B, T, H, K] (K <= 256); v: [B, T, HV, V] with HV a multiple of H; g (log decay, <= 0),
    beta: [B, T, HV]; initial_state: [N, HV, K, V] (N = B, or documents in cu_seqlens, B == 1).
    Inputs are not validated here (`gated_delta_rule` does that).
    Returns (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 or None).
    """
    return call_gdn_op(_gdn_chunk, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)


# The name of the chunked Triton path since the first (tf32) kernels were removed.
chunk_gated_delta_rule_triton = chunk_gated_delta_rule_triton_split
