"""Triton kernels of the chunked gated delta rule (chunk C = 64), forward and backward, with
operands split into two bf16 terms (backend "triton-split"; `chunk_split.py` launches them).

Notation per value head and chunk (rows i, j = 0..C-1), as in `hybridlm.ops.gated_delta_rule.chunk`:
q, k, v the raw inputs, r_q, r_k the reciprocal L2 norms of their rows (1 without normalisation),
Q = scale diag(r_q) q and K = diag(r_k) k, gamma the within-chunk cumulative log decay,
Gamma_ij = exp(gamma_i - gamma_j) for i >= j (0 above), S the chunk-entry state [K, V]:

    A = strictly_lower(diag(beta) K K^T * Gamma),  T = (I + A)^-1
    W = T diag(beta e^gamma) K,  U = T diag(beta) v,  Delta = U - W S
    O = diag(e^gamma) Q S + P Delta,  P = Q K^T * Gamma
    S_next = e^gamma_C S + K^T diag(e^(gamma_C - gamma)) Delta

Kernels. Forward: `_prepare_kernel` (per chunk: T, W, U and the row scales), `_state_fwd_kernel`
(per sequence, value head and V tile: the sequential pass, chunk-entry states and Delta; with
float16 products the forward uses `_state_fwd_rows_kernel`, the same pass carried as S^T with a
scale per row), `_output_kernel` (per chunk: O). Backward: the same prepare (also T, P^T dO) and state passes, then
`_state_bwd_kernel` (the reverse pass: state gradients and dDelta), `_grad_q_kernel` (per chunk:
the gradient of q through the states, which needs only them and dO), `_grad_local_kernel` and
`_grad_state_kernel` (per chunk: the gradients without / through the states, including the
backward through the UT transform) and `_qk_norm_bwd_kernel` (the L2 norms, summed over groups;
`_grad_state_kernel` does it itself when HV == H).

Precision. With bf16 inputs every matmul runs on bf16 tensor cores with float32 accumulation,
and no operand is rounded further than the inputs already are: a product of two raw bf16 inputs
(q k^T, k k^T) is exact; a float32 operand x (T, S, Delta, ...) enters as its two-term split
x = hi + lo (hi = bf16(x), lo = bf16(x - hi), about 16 significant bits), so x @ raw takes two
bf16 matmuls and x @ y three (hi hi + lo hi + hi lo). The row scales (norms, decays, beta) are
applied in float32 outside the matmuls: diag(a) q S = a * (q S). Buffers between kernels that feed
matmuls (W, T, states, Delta and their gradients) are stored split, as two bf16 tensors (the bytes
of float32); U and P^T dO, used elementwise, are float32. With bf16 inputs this leaves the outputs
and gradients at the bf16 rounding of o, dq, dk, dv themselves (about 1.7e-3 against float64) and
everything kept in float32 within about 4e-5, where one bf16 rounding of the matmul operands (fla's
choice) gives about 1e-2 (docs/benchmarks.md). Float32 and float16 inputs are split like any
float32 operand. For bf16 inputs the host can take one term instead (constexprs OUT_TERMS and
STORE_S_LO: the states stored for the output kernel, the default; S_TERMS, W_TERMS, DD_TERMS: S
and W in the forward pass's W S, dDelta and W in the reverse pass's W^T dDelta, opt-in, since with
no decay their errors accumulate past the 5e-3 bar; chunk_split.KernelOptions). With bf16 inputs
and the q/k L2 norm the two state passes take one float16 term per operand instead (constexpr
F16; the per-step products, about 11 significant bits, scaled by a power of two per tile where
the range is not bounded); the default, with the worst error against float64 at 2.42e-3. With
those, the passes also store S, dS (backward) and Delta (forward) as they multiply them, in float16
with a power-of-two scale per tile, for float16 products in the gradient and output kernels
(constexprs STORE_F16, D_F16, F16; worst error 2.44e-3).

Every exponent is masked before exp and is <= 0 for g <= 0 (no division by a decay).

Layouts: q, k [NTOK, H, K] with tokens SQK elements apart, v [NTOK, HV, V] with tokens SV apart
(views into a packed q|k|v tensor, or contiguous); every other tensor is contiguous.

Hopper + Triton 3.4..3.7.0 miscompile `tl.trans` of a computed matrix used as a dot operand (fla
#640): the kernels transpose only loaded tiles. The two computed matrices needed both ways in
`_grad_local_kernel` go through a per-program scratch tile in global memory. 4 warps throughout:
with 8, Triton lays chained 64-row matmuls out with all warps along the rows, duplicating their
accumulators in both warpgroups.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter multiplies bf16 blocks wrongly (Triton 3.9 reads their bits as integers) and
    # truncates float32 -> bf16; the GPU rounds to nearest even and multiplies bf16 exactly into
    # float32. Emulate that: round explicitly, and multiply bf16 operands as float32 (exact).

    @triton.jit
    def _bf16(x):
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _dot(a, b, acc):
        # The GPU compiler refuses operands of different dtypes; so must the CPU tests.
        tl.static_assert(a.dtype == b.dtype, "tl.dot operands must have the same dtype")
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)

    @triton.jit
    def _prefetch_l2(ptrs):
        pass  # a hint on the GPU; the interpreter runs no inline assembly

else:

    @triton.jit
    def _bf16(x):
        return x.to(tl.bfloat16)

    @triton.jit
    def _dot(a, b, acc):
        """acc + a @ b: bf16 operands, float32 accumulation."""
        return tl.dot(a, b, acc)

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask L2 to fetch the 128-byte lines holding ptrs (a hint: nothing waits for it)."""
        tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _split(x):
    """The two-term bf16 split of a float32 tile: x = hi + lo to about 16 significant bits."""
    hi = _bf16(x)
    return hi, _bf16(x - hi.to(tl.float32))


@triton.jit
def _mm_ss(ah, al, bh, bl, acc):
    """acc + (ah + al) @ (bh + bl), dropping the lo @ lo term."""
    acc = _dot(ah, bh, acc)
    acc = _dot(al, bh, acc)
    return _dot(ah, bl, acc)


@triton.jit
def _mm_rs(a, bh, bl, acc):
    """acc + a @ (bh + bl) for a raw input tile a (exact in bf16 if it is bf16)."""
    if a.dtype == tl.bfloat16:
        acc = _dot(a, bh, acc)
        acc = _dot(a, bl, acc)
    else:
        ah, al = _split(a.to(tl.float32))
        acc = _mm_ss(ah, al, bh, bl, acc)
    return acc


@triton.jit
def _mm_sr(ah, al, b, acc):
    """acc + (ah + al) @ b for a raw input tile b."""
    if b.dtype == tl.bfloat16:
        acc = _dot(ah, b, acc)
        acc = _dot(al, b, acc)
    else:
        bh, bl = _split(b.to(tl.float32))
        acc = _mm_ss(ah, al, bh, bl, acc)
    return acc


@triton.jit
def _mm_rr(a, b, acc):
    """acc + a @ b for two raw input tiles: one exact bf16 matmul for bf16 inputs."""
    if a.dtype == tl.bfloat16:
        acc = _dot(a, b, acc)
    else:
        ah, al = _split(a.to(tl.float32))
        bh, bl = _split(b.to(tl.float32))
        acc = _mm_ss(ah, al, bh, bl, acc)
    return acc


@triton.jit
def _mm_sr_t(ah, al, b, acc, TERMS: tl.constexpr):
    """acc + (ah + al) @ b for a raw input tile b; TERMS = 1 (bf16 b only) uses ah only."""
    if TERMS == 1:
        acc = _dot(ah, b, acc)
    else:
        acc = _mm_sr(ah, al, b, acc)
    return acc


@triton.jit
def _pow2_pair(m):
    """(e, 1 / e) for the power of two e = 2^(ceil(log2 m) - 14), elementwise for m >= 0 (m below
    1e-30 counts as 1e-30): m / e lies in (2^13, 2^14]. Read off m's float32 exponent and mantissa
    bits, so no log2 / exp2 / division sits on a sequential pass's critical path; both results are
    normal floats for every m up to float32's largest."""
    bits = tl.maximum(m, 1e-30).to(tl.int32, bitcast=True)
    c = (bits >> 23) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)  # ceil(log2 m)
    e = ((c + 113) << 23).to(tl.float32, bitcast=True)
    return e, ((141 - c) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_scale(m):
    """The power of two e with m / e in (2^13, 2^14] (elementwise, m >= 0; m = 0 counts as 1e-30)."""
    e, _ = _pow2_pair(m)
    return e


@triton.jit
def _f16_scale(x):
    """The power of two e of `_f16_scaled`, and 1 / e computed apart (exact either way): a product
    x * (1 / e) written twice would be one value, stored from the matmul operand's layout."""
    return _pow2_pair(tl.max(tl.abs(x)))


@triton.jit
def _f16_scaled(x):
    """x (float32) as float16 x16 times a power of two e, x = e * x16 to about 11 significant bits:
    e puts the largest |x| in (2^13, 2^14], so no tile overflows float16 and none underflows it
    (the smallest normal float16 is 2^-28 of that)."""
    e, _ = _f16_scale(x)
    return (x * (1.0 / e)).to(tl.float16), e


@triton.jit
def _diagonal_blocks(A, BT: tl.constexpr, S: tl.constexpr):
    """The BT // S diagonal blocks of A [BT, BT], as [BT // S, S, S]."""
    NB: tl.constexpr = BT // S
    b = tl.arange(0, NB)
    keep = b[:, None, None, None] == b[None, None, :, None]
    return tl.sum(tl.where(keep, tl.reshape(A, [NB, S, NB, S]), 0.0), axis=2)


@triton.jit
def _block_diagonal(D, BT: tl.constexpr, S: tl.constexpr):
    """The [BT, BT] block-diagonal matrix whose diagonal blocks are D [BT // S, S, S]."""
    NB: tl.constexpr = BT // S
    b = tl.arange(0, NB)
    keep = b[:, None, None, None] == b[None, None, :, None]
    return tl.reshape(tl.where(keep, tl.expand_dims(D, 2), 0.0), [BT, BT])


@triton.jit
def _double_blocks(inv, ah, al, ii, jj, FIRST: tl.constexpr, LAST: tl.constexpr):
    """Levels FIRST..LAST of `_unit_lower_inverse`: inv, the inverse in blocks of 2^(FIRST - 1),
    becomes the inverse in blocks of 2^LAST; ah + al is A split (2-D tiles, or batches of diagonal
    blocks with ii, jj broadcast over the batch)."""
    for level in tl.static_range(FIRST, LAST + 1):
        same_block = (ii >> level) == (jj >> level)
        other_half = (ii >> (level - 1)) != (jj >> (level - 1))
        ih, il = _split(inv)
        x = _mm_ss(ih, il, ah, al, tl.zeros_like(inv))
        xh, xl = _split(tl.where(same_block & other_half, -x, 0.0))
        inv = _mm_ss(xh, xl, ih, il, inv)
    return inv


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, LOG2_DIAG: tl.constexpr = 0):
    """(I + A)^-1 for a strictly lower triangular A [BT, BT] (float32), by doubling the block size.

    With T the inverse of the block diagonal of (I + A) in blocks of size h, the inverse in blocks of
    2h is T - T C T, C the part of A in the lower-left h x h quadrant of each 2h block
    ([[X, 0], [C, Y]]^-1 = [[X^-1, 0], [-Y^-1 C X^-1, Y^-1]]). Exact block forward substitution:
    no power series, so no growth-and-cancellation when beta is near 2.

    T C equals T A on C's quadrants (T is zero outside the h blocks, and there A's entries are C's),
    so each level multiplies by the whole of A and masks the product: A is split, and put in
    shared memory for the matmuls, once instead of once per level, with the same products.

    LOG2_DIAG > 0: the levels up to blocks of 2^LOG2_DIAG run on the diagonal blocks of that size
    only, as a batch of small matmuls (BT / 2^LOG2_DIAG times fewer products than on the whole
    tile, which are zero outside those blocks); the result is the same up to rounding order.
    """
    if LOG2_DIAG > 0:
        S: tl.constexpr = 1 << LOG2_DIAG
        D = _diagonal_blocks(A, BT, S)
        i3 = tl.arange(0, S)[None, :, None]
        j3 = tl.arange(0, S)[None, None, :]
        dh, dl = _split(D)
        inv = tl.where(i3 == j3, 1.0, 0.0) - tl.where((i3 // 2) == (j3 // 2), D, 0.0)
        inv = _block_diagonal(_double_blocks(inv, dh, dl, i3, j3, 2, LOG2_DIAG), BT, S)
        first: tl.constexpr = LOG2_DIAG + 1
    else:
        ii = tl.arange(0, BT)[:, None]
        jj = tl.arange(0, BT)[None, :]
        inv = tl.where(ii == jj, 1.0, 0.0) - tl.where((ii // 2) == (jj // 2), A, 0.0)
        first: tl.constexpr = 2
    ah, al = _split(A)
    return _double_blocks(inv, ah, al, tl.arange(0, BT)[:, None], tl.arange(0, BT)[None, :], first, LOG2_BT)


@triton.jit
def _unit_lower_inverse_f16(A, BT: tl.constexpr, LOG2_BT: tl.constexpr):
    """`_unit_lower_inverse` with one float16 term per product operand (10 matmuls instead of 30):
    A scaled once, the running inverse and each correction scaled per tile by a power of two
    (`_f16_scaled`), so neither overflows nor underflows float16 whatever T's growth (beta near 2).
    About 11 significant bits per operand instead of 16 (benchmarks/gdn_precision_study.py)."""
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    inv = tl.where(ii == jj, 1.0, 0.0) - tl.where((ii // 2) == (jj // 2), A, 0.0)
    a16, ea = _f16_scaled(A)
    for level in tl.static_range(2, LOG2_BT + 1):
        same_block = (ii >> level) == (jj >> level)
        other_half = (ii >> (level - 1)) != (jj >> (level - 1))
        i16, ei = _f16_scaled(inv)
        x = _dot(i16, a16, tl.zeros([BT, BT], dtype=tl.float32))  # masked as in `_unit_lower_inverse`
        x16, ex = _f16_scaled(tl.where(same_block & other_half, x, 0.0) * (-(ei * ea)))
        inv += _dot(x16, i16, tl.zeros([BT, BT], dtype=tl.float32)) * (ex * ei)
    return inv


@triton.jit
def _chunk_bounds(slot, chunk_seq, chunk_local, cu_seqlens, BT: tl.constexpr):
    """(sequence or -1, chunk index in it, first token t0 (int64), valid rows in the chunk)."""
    seq = tl.load(chunk_seq + slot)
    local = tl.load(chunk_local + slot)
    safe = tl.maximum(seq, 0)
    bos = tl.load(cu_seqlens + safe).to(tl.int64)
    eos = tl.load(cu_seqlens + safe + 1).to(tl.int64)
    t0 = bos + local * BT
    return seq, local, t0, tl.minimum(eos - t0, BT).to(tl.int32)


@triton.jit
def _slot_bounds(slot, chunk_seq, chunk_local, cu_seqlens, chunk_offsets, seq_len, BT: tl.constexpr,
                 UNIFORM: tl.constexpr):
    """`_chunk_bounds` and the slot's global chunk index (int64). UNIFORM (a batch of sequences of
    seq_len tokens each, `SequenceLayout.uniform_len`): computed from the slot, with no dependent
    reads of the layout before the chunk's own loads can start."""
    if UNIFORM:
        nc = tl.cdiv(seq_len, BT)
        seq = slot // nc
        local = slot - seq * nc
        t0 = seq.to(tl.int64) * seq_len + local * BT
        n = tl.minimum(seq_len - local * BT, BT)
        chunk = slot.to(tl.int64)
    else:
        seq, local, t0, n = _chunk_bounds(slot, chunk_seq, chunk_local, cu_seqlens, BT)
        chunk = (tl.load(chunk_offsets + tl.maximum(seq, 0)) + local).to(tl.int64)
    return seq, local, t0, n, chunk


@triton.jit
def _sequence_chunks(n, cu_seqlens, chunk_offsets, BT: tl.constexpr):
    """(first token, end token, global index of the first chunk, number of chunks) of sequence n,
    int64: the sequential kernels' walk over one sequence."""
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    return bos, eos, tl.load(chunk_offsets + n).to(tl.int64), tl.cdiv(eos - bos, BT)


# Tiles are addressed as a scalar 64-bit base pointer plus int32 offsets inside the tile: per-element
# 64-bit pointers would cost two registers per element of every tile.
@triton.jit
def _load(base, stride, n_rows, n_cols, R: tl.constexpr, C: tl.constexpr):
    """x[r, c] = base[r * stride + c] for r < n_rows, c < n_cols, else 0: a [R, C] tile."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(base + r[:, None] * stride + c[None, :], mask=(r[:, None] < n_rows) & (c[None, :] < n_cols), other=0.0)


@triton.jit
def _load_t(base, stride, n_rows, n_cols, R: tl.constexpr, C: tl.constexpr):
    """The transpose [C, R] of `_load`'s tile, read transposed from memory."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(base + r[None, :] * stride + c[:, None], mask=(r[None, :] < n_rows) & (c[:, None] < n_cols), other=0.0)


@triton.jit
def _prefetch_tile(base, stride, n_rows, n_cols, R: tl.constexpr, LINES: tl.constexpr, STEP: tl.constexpr):
    """L2 prefetch of the [R, n_cols] tile `_load` would read at base: LINES addresses STEP elements
    apart in each row (one per 128-byte line; the last clamped to the row's last element, which
    covers a row that is not aligned), rows past n_rows mapped to the first (always valid) row. The sequential passes read each chunk's tiles
    through a two-stage pipeline whose loads Triton issues only at the end of the step before, so
    without this most of a step waits for device memory."""
    r = tl.arange(0, R)[:, None]
    c = tl.minimum(tl.arange(0, LINES)[None, :] * STEP, n_cols - 1)
    _prefetch_l2(base + tl.where(r < n_rows, r, 0) * stride + c)


@triton.jit
def _store(base, stride, n_rows, n_cols, value, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    if base.dtype.element_ty == tl.bfloat16:
        if value.dtype == tl.float32:
            value = _bf16(value)
    tl.store(base + r[:, None] * stride + c[None, :], value.to(base.dtype.element_ty),
             mask=(r[:, None] < n_rows) & (c[None, :] < n_cols))


@triton.jit
def _store_split(hi, lo, offset, stride, n_rows, n_cols, value, R: tl.constexpr, C: tl.constexpr):
    vh, vl = _split(value)
    _store(hi + offset, stride, n_rows, n_cols, vh, R, C)
    _store(lo + offset, stride, n_rows, n_cols, vl, R, C)


@triton.jit
def _load_vec(base, stride, n, R: tl.constexpr):
    r = tl.arange(0, R)
    return tl.load(base + r * stride, mask=r < n, other=0.0).to(tl.float32)


@triton.jit
def _rnorm(x, NORM: tl.constexpr):
    """Reciprocal L2 norms [R] of the rows of a raw tile [R, C] (ones without normalisation)."""
    if NORM:
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, 1) + 1e-6)
    else:
        r = tl.full([x.shape[0]], 1.0, tl.float32)
    return r


@triton.jit
def _prepare_kernel(
    q, k, v, g, beta, do,
    w_hi, w_lo, u, kscale, qscale, t_hi, t_lo, dvl, w16, k16, q16, dvl_scale,
    cu_seqlens, chunk_seq, chunk_local,
    scale, H, HV, K, V, SQK, SV,
    BT: tl.constexpr, LOG2_BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, BACKWARD: tl.constexpr, W_TERMS: tl.constexpr = 2, F16: tl.constexpr = False,
    STORE_W: tl.constexpr = True, F16_Q: tl.constexpr = False, INV_F16: tl.constexpr = False,
    chunk_offsets=None, decay=None, do16=None, do_scale=None, U_T: tl.constexpr = False,
    seq_len=0, UNIFORM: tl.constexpr = False, V_LINES: tl.constexpr = 0, LOG2_DIAG: tl.constexpr = 0,
):
    """Per (chunk slot, value head): W (split; its hi term only at W_TERMS = 1), U,
    kscale = r_k e^(gamma_C - gamma); in BACKWARD mode also T (split), qscale = scale r_q e^gamma
    and P^T dO.

    w_hi, w_lo: [NTOK, HV, K] bf16; u, dvl: [NTOK, HV, V] float32; kscale, qscale: [NTOK, HV]
    float32; t_hi, t_lo: [NTOK, HV, BT] bf16 (row i of the chunk's T). F16: also W and
    kscale * k in float16 (w16, k16: [NTOK, HV, K]) for the state passes' float16 products; F16_Q
    (BACKWARD only): qscale * q too (q16), and P^T dO in float16 (dvl), each [BT, BV] tile scaled by
    a power of two stored in dvl_scale[slot, hv, V tile] (float32), for the reverse pass's, and dO
    likewise (do16, do_scale); STORE_W = False skips w_hi and
    w_lo (where only the float16 passes read W). INV_F16: T by `_unit_lower_inverse_f16`.
    decay[chunk, hv] = e^gamma_C (chunk = chunk_offsets[sequence] + chunk index in it), so that the
    state passes need no reduction for it. U_T (forward only, for `_state_fwd_rows_kernel`): U stored
    transposed per chunk, u[chunk, hv, V, BT] (float32), the layout that pass reads. LOG2_DIAG: the
    inverse's levels on a batch of diagonal blocks (`_unit_lower_inverse`).
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n, chunk = _slot_bounds(slot, chunk_seq, chunk_local, cu_seqlens, chunk_offsets, seq_len, BT,
                                            UNIFORM)
    if seq < 0:
        return
    if V_LINES > 0:  # v is read last, after the inverse: ask L2 for it now
        _prefetch_tile(v + t0 * SV + hv * V, SV, n, V, BT, V_LINES, 64)
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    ii = o_t[:, None]
    jj = o_t[None, :]
    qk_base = t0 * SQK + h * K
    kx = _load(k + qk_base, SQK, n, K, BT, BK)
    rk = _rnorm(kx, NORM)
    gv = _load_vec(g + t0 * HV + hv, HV, n, BT)
    bv = _load_vec(beta + t0 * HV + hv, HV, n, BT)
    # Padded rows have g = 0, so gamma there equals gamma at the last real row (= gamma_C).
    gam = tl.cumsum(gv, 0)
    gam_last = tl.sum(gv, 0)
    tl.store(decay + chunk * HV + hv, tl.exp(gam_last))
    if F16:  # early, while few tiles are live
        ks = rk * tl.exp(gam_last - gam)
        _store(k16 + (t0 * HV + hv) * K, HV * K, n, K, kx.to(tl.float32) * ks[:, None], BT, BK)

    kk = _mm_rr(kx, tl.trans(kx), tl.zeros([BT, BT], dtype=tl.float32))
    decay = tl.exp(tl.where(ii > jj, gam[:, None] - gam[None, :], float("-inf")))
    A = kk * ((bv * rk)[:, None] * rk[None, :]) * decay
    if INV_F16:
        T = _unit_lower_inverse_f16(A, BT, LOG2_BT)
    else:
        T = _unit_lower_inverse(A, BT, LOG2_BT, LOG2_DIAG)

    hk = (t0 * HV + hv) * K
    th, tl_ = _split(T * (bv * tl.exp(gam) * rk)[None, :])
    wx = _mm_sr(th, tl_, kx, tl.zeros([BT, BK], dtype=tl.float32))
    if STORE_W:
        if W_TERMS == 1:
            _store(w_hi + hk, HV * K, n, K, wx, BT, BK)
        else:
            _store_split(w_hi, w_lo, hk, HV * K, n, K, wx, BT, BK)
    tl.store(kscale + t0 * HV + hv + o_t * HV, rk * tl.exp(gam_last - gam), mask=o_t < n)
    if F16:
        _store(w16 + hk, HV * K, n, K, wx, BT, BK)
    th, tl_ = _split(T * bv[None, :])

    if BACKWARD:
        qx = _load(q + qk_base, SQK, n, K, BT, BK)
        rq = _rnorm(qx, NORM)
        qs = scale * rq * tl.exp(gam)
        tl.store(qscale + t0 * HV + hv + o_t * HV, qs, mask=o_t < n)
        if F16_Q:
            _store(q16 + hk, HV * K, n, K, qx.to(tl.float32) * qs[:, None], BT, BK)
        _store_split(t_hi, t_lo, (t0 * HV + hv) * BT, HV * BT, n, BT, T, BT, BT)
        # P^T[j, i] = P[i, j] for i >= j, built directly in transposed form: k_j . q_i.
        pt = _mm_rr(kx, tl.trans(qx), tl.zeros([BT, BT], dtype=tl.float32))
        pt = pt * (rk[:, None] * (scale * rq)[None, :])
        pt = pt * tl.exp(tl.where(jj >= ii, gam[None, :] - gam[:, None], float("-inf")))
        ph, pl = _split(pt)

    hvv = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        vx = _load(v + t0 * SV + hv * V + iv * BV, SV, n, cols, BT, BV)
        ux = _mm_sr(th, tl_, vx, tl.zeros([BT, BV], dtype=tl.float32))
        if U_T:
            # all BT columns: U's rows past the chunk's end are 0 (v is 0 there), stored whole
            _store(u + ((chunk * HV + hv) * V + iv * BV) * BT, BT, cols, BT, tl.trans(ux), BV, BT)
        else:
            _store(u + hvv + iv * BV, HV * V, n, cols, ux, BT, BV)
        if BACKWARD:
            dox = _load(do + hvv + iv * BV, HV * V, n, cols, BT, BV)
            pdo = _mm_sr(ph, pl, dox, tl.zeros([BT, BV], dtype=tl.float32))
            if F16_Q:
                pdo16, ep = _f16_scaled(pdo)
                _store(dvl + hvv + iv * BV, HV * V, n, cols, pdo16, BT, BV)
                tl.store(dvl_scale + (slot.to(tl.int64) * HV + hv) * tl.cdiv(V, BV) + iv, ep)
                do16x, eo = _f16_scaled(dox.to(tl.float32))
                _store(do16 + hvv + iv * BV, HV * V, n, cols, do16x, BT, BV)
                tl.store(do_scale + (slot.to(tl.int64) * HV + hv) * tl.cdiv(V, BV) + iv, eo)
            else:
                _store(dvl + hvv + iv * BV, HV * V, n, cols, pdo, BT, BV)


@triton.jit
def _state_fwd_kernel(
    k, w_hi, w_lo, u, decay, kscale, h0, s_hi, s_lo, d_hi, d_lo, ht, w16, k16,
    cu_seqlens, chunk_offsets,
    H, HV, K, V, SQK, SV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, S_TERMS: tl.constexpr = 2,
    STORE_S_LO: tl.constexpr = True, W_TERMS: tl.constexpr = 2, F16: tl.constexpr = False,
    s_scale=None, STORE_F16: tl.constexpr = False, d_scale=None, D_F16: tl.constexpr = False,
):
    """Per (sequence, value head, V tile): the sequential pass over the sequence's chunks.

    Stores each chunk-entry state S [K, V] in s_hi/s_lo[chunk] ([NCHUNK, HV, K, V] bf16, split) and
    Delta = U - W S in d_hi/d_lo ([NTOK, HV, V] bf16, split); then
    S <- e^gamma_C S + k^T (kscale * Delta), with e^gamma_C from decay[chunk, hv] (the prepare kernel's). h0 / ht: [N, HV, K, V] float32 initial / final states.
    S_TERMS = 1 uses only S's hi term in W S (one matmul less per step; final state within about
    2e-4 instead of 4e-6 with bf16 inputs: benchmarks/gdn_precision_study.py). STORE_S_LO = False
    stores only the hi term of S (for an output kernel at OUT_TERMS = 1; s_lo is not written).
    W_TERMS = 1 reads only W's hi term (w_lo is not read).
    F16 = True: the two products of a step, W S and (kscale * k)^T Delta, take one float16 term
    of each operand: W and kscale * k as the prepare kernel stored them (w16, k16), S and Delta
    scaled by a power of two per tile (`_f16_scaled`). 2 matmuls a step instead of 5, each operand
    to about 11 bits instead of 16 (bf16 one-term: 8). S_TERMS and W_TERMS are then unused. Only
    with the L2 norm, which bounds W and kscale * k (|entries| <= about 2), so that float16 holds them.
    STORE_F16 (with F16, for the float16 gradient kernel): stores S as the pass multiplies it, float16
    in s_hi ([NCHUNK, HV, K, V]) and its power-of-two scale per V tile in s_scale
    ([NCHUNK, HV, cdiv(V, BV)] float32), instead of the bf16 split (s_lo is not written).
    D_F16 (with F16, for `_output_kernel`'s D_F16): Delta likewise, float16 in d_hi with its scale
    per V tile in d_scale (d_lo is not written).
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    h = hv // (HV // H)
    bos, eos, c0, num_chunks = _sequence_chunks(n, cu_seqlens, chunk_offsets, BT)
    cols = V - iv * BV
    kv = K * V

    if HAS_H0:
        S = _load(h0 + (n * HV + hv) * kv + iv * BV, V, K, cols, BK, BV).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    next_decay = tl.load(decay + c0 * HV + hv, mask=num_chunks > 0, other=1.0)
    for c in range(0, num_chunks):
        chunk_decay = next_decay  # e^gamma_C, from the prepare kernel, read a step ahead (as below)
        next_decay = tl.load(decay + (c0 + tl.minimum(c + 1, num_chunks - 1)) * HV + hv)
        s_off = ((c0 + c) * HV + hv) * kv + iv * BV
        if STORE_F16:  # as in `_state_bwd_kernel`
            es, inv_es = _f16_scale(S)
            _store(s_hi + s_off, V, K, cols, S * inv_es, BK, BV)
            tl.store(s_scale + ((c0 + c) * HV + hv) * tl.cdiv(V, BV) + iv, es)
        else:
            sh, sl = _split(S)
            _store(s_hi + s_off, V, K, cols, sh, BK, BV)
            if STORE_S_LO:
                _store(s_lo + s_off, V, K, cols, sl, BK, BV)
        t0 = bos + c * BT
        rows = tl.minimum(eos - t0, BT).to(tl.int32)
        hk = (t0 * HV + hv) * K
        hvv = (t0 * HV + hv) * V + iv * BV
        ux = _load(u + hvv, HV * V, rows, cols, BT, BV)
        if F16:
            if not STORE_F16:
                es, _ = _f16_scale(S)
            s16 = (S * (1.0 / es)).to(tl.float16)
            ws = _dot(_load(w16 + hk, HV * K, rows, K, BT, BK), s16, tl.zeros([BT, BV], dtype=tl.float32)) * es
        else:
            wh = _load(w_hi + hk, HV * K, rows, K, BT, BK)
            ws = _dot(wh, sh, tl.zeros([BT, BV], dtype=tl.float32))
            if W_TERMS == 2:
                ws = _dot(_load(w_lo + hk, HV * K, rows, K, BT, BK), sh, ws)
            if S_TERMS == 2:
                ws = _dot(wh, sl, ws)
        delta = ux - ws
        if D_F16:  # stored apart from the matmul operand, as S above
            ed, inv_ed = _f16_scale(delta)
            _store(d_hi + hvv, HV * V, rows, cols, delta * inv_ed, BT, BV)
            tl.store(d_scale + ((c0 + c) * HV + hv) * tl.cdiv(V, BV) + iv, ed)
        else:
            _store_split(d_hi, d_lo, hvv, HV * V, rows, cols, delta, BT, BV)
        if F16:
            if not D_F16:
                ed, _ = _f16_scale(delta)
            d16 = (delta * (1.0 / ed)).to(tl.float16)
            kt = tl.trans(_load(k16 + hk, HV * K, rows, K, BT, BK))
            S = _dot(kt, d16, tl.zeros([BK, BV], dtype=tl.float32)) * ed + S * chunk_decay
        else:
            kx = _load(k + t0 * SQK + h * K, SQK, rows, K, BT, BK)
            ks = _load_vec(kscale + t0 * HV + hv, HV, rows, BT)
            dh, dl = _split(delta * ks[:, None])
            S = _mm_rs(tl.trans(kx), dh, dl, S * chunk_decay)
    if STORE_HT:
        _store(ht + (n * HV + hv) * kv + iv * BV, V, K, cols, S, BK, BV)


@triton.jit
def _state_fwd_rows_kernel(
    k16, w16, ut, decay, h0, s_hi, d16, d_scale, ht,
    cu_seqlens, chunk_offsets,
    HV, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PREFETCH: tl.constexpr = False,
    LATE_STORES: tl.constexpr = False,
):
    """Per (sequence, value head, V tile): the forward's sequential pass with float16 products,
    carried transposed, S^T [V, K], with one power-of-two scale per row (per value column of S).

        Delta^T = U^T - S^T W^T,  S^T <- e^gamma_C S^T + Delta^T (kscale * k)

    Both products contract over the rows' other axis (K, then the chunk's tokens), so a row's scale
    factors out of them: the scales are row maxima, which stay inside one warp (the matmul
    accumulators split rows across warps), and the float16 operands S^T, Delta^T enter the matmuls
    from registers. No reduction or shared-memory round trip across the warps on the critical path,
    where `_state_fwd_kernel`'s tile-wide scales need both. w16, k16: [NTOK, HV, K] float16 (W and
    kscale * k, from the prepare kernel); ut: [NCHUNK, HV, V, BT] float32 (U^T per chunk, the
    prepare kernel's U_T).
    Stores, for `_output_kernel` at OUT_TERMS = 1 with D_F16 and D_BV = 1, each chunk-entry S as one
    bf16 term (s_hi [NCHUNK, HV, K, V]) and Delta as it multiplies it (d16 [NTOK, HV, V] float16,
    its scale per value column in d_scale [NCHUNK, HV, V]). h0 / ht: [N, HV, K, V] float32. Only
    with the L2 norm (W and kscale * k bounded, so float16 holds them). The rows' scales put each
    row's largest |entry| in (2^13, 2^14] (`_pow2_pair`): about 11 significant bits per entry, and
    the same float16 roundings as `_state_fwd_kernel`'s F16 (x / e rounds alike for any power of
    two e, barring float16 subnormals).
    PREFETCH: the next chunk's tiles to L2 at the start of each step (`_prefetch_tile`).
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    bos, eos, c0, num_chunks = _sequence_chunks(n, cu_seqlens, chunk_offsets, BT)
    cols = V - iv * BV
    r = tl.arange(0, BV)
    kv = K * V
    if HAS_H0:
        S = _load_t(h0 + (n * HV + hv) * kv + iv * BV, V, K, cols, BK, BV).to(tl.float32)
    else:
        S = tl.zeros([BV, BK], dtype=tl.float32)
    next_decay = tl.load(decay + c0 * HV + hv, mask=num_chunks > 0, other=1.0)
    for c in range(0, num_chunks):
        chunk = c0 + c
        # e^gamma_C is read one step ahead: it is needed at the step's end, and read there the pass
        # waited on it every step (5.7% of its stall samples on an H200)
        chunk_decay = next_decay
        next_decay = tl.load(decay + (c0 + tl.minimum(c + 1, num_chunks - 1)) * HV + hv)
        if PREFETCH:
            tn = bos + tl.minimum(c + 1, num_chunks - 1) * BT
            rn = tl.minimum(eos - tn, BT).to(tl.int32)
            _prefetch_tile(w16 + (tn * HV + hv) * K, HV * K, rn, K, BT, (BK + 31) // 32, 64)
            _prefetch_tile(k16 + (tn * HV + hv) * K, HV * K, rn, K, BT, (BK + 31) // 32, 64)
            cn = c0 + tl.minimum(c + 1, num_chunks - 1)
            _prefetch_tile(ut + ((cn * HV + hv) * V + iv * BV) * BT, BT, cols, BT, BV, (BT + 31) // 32, 32)
        es, inv_es = _pow2_pair(tl.max(tl.abs(S), 1))
        st = (S * inv_es[:, None]).to(tl.float16)
        if not LATE_STORES:
            _store(s_hi + (chunk * HV + hv) * kv + iv * BV, V, K, cols, tl.trans(S), BK, BV)
        row = (chunk * HV + hv) * V + iv * BV  # first row of this tile in the per-chunk buffers
        t0 = bos + c * BT
        rows = tl.minimum(eos - t0, BT).to(tl.int32)
        hk = (t0 * HV + hv) * K
        x = _dot(st, tl.trans(_load(w16 + hk, HV * K, rows, K, BT, BK)), tl.zeros([BV, BT], dtype=tl.float32))
        if LATE_STORES:
            _store(s_hi + (chunk * HV + hv) * kv + iv * BV, V, K, cols, tl.trans(S), BK, BV)
        delta = _load(ut + row * BT, BT, cols, BT, BV, BT) - x * es[:, None]  # 0 past the chunk's end
        ed, inv_ed = _pow2_pair(tl.max(tl.abs(delta), 1))
        dt = (delta * inv_ed[:, None]).to(tl.float16)
        if not LATE_STORES:
            _store(d16 + (t0 * HV + hv) * V + iv * BV, HV * V, rows, cols, tl.trans(delta * inv_ed[:, None]), BT, BV)
            tl.store(d_scale + row + r, ed, mask=r < cols)
        kx = _load(k16 + hk, HV * K, rows, K, BT, BK)
        update = _dot(dt, kx, tl.zeros([BV, BK], dtype=tl.float32))
        if LATE_STORES:
            _store(d16 + (t0 * HV + hv) * V + iv * BV, HV * V, rows, cols, tl.trans(delta * inv_ed[:, None]), BT, BV)
            tl.store(d_scale + row + r, ed, mask=r < cols)
        S = update * ed[:, None] + S * chunk_decay
    if STORE_HT:
        _store(ht + (n * HV + hv) * kv + iv * BV, V, K, cols, tl.trans(S), BK, BV)


@triton.jit
def _output_kernel(
    q, k, g, s_hi, s_lo, d_hi, d_lo, o,
    cu_seqlens, chunk_seq, chunk_local, chunk_offsets,
    scale, H, HV, K, V, SQK, SV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, OUT_TERMS: tl.constexpr = 2, d_scale=None, D_F16: tl.constexpr = False,
    D_BV: tl.constexpr = 32, seq_len=0, UNIFORM: tl.constexpr = False,
):
    """Per (chunk slot, value head): O = (scale r_q e^gamma) * (q S) + P Delta.

    OUT_TERMS = 1 (bf16 q only) reads only S's hi term: one matmul less per V tile and half the
    state reads; o stays at its bf16 rounding (benchmarks/gdn_precision_study.py).
    D_F16 (with the L2 norm, which bounds |P| by the scale): Delta in float16 as the forward
    state pass stored it (d_hi, its scales per V tile of D_BV columns in d_scale) and P in
    float16: one matmul for P Delta instead of three.
    (D_BV = 1: a scale per column, as `_state_fwd_rows_kernel` stores them.)
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n, chunk = _slot_bounds(slot, chunk_seq, chunk_local, cu_seqlens, chunk_offsets, seq_len, BT,
                                            UNIFORM)
    if seq < 0:
        return
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    ii = o_t[:, None]
    jj = o_t[None, :]
    qk_base = t0 * SQK + h * K
    qx = _load(q + qk_base, SQK, n, K, BT, BK)
    kx = _load(k + qk_base, SQK, n, K, BT, BK)
    rq = _rnorm(qx, NORM) * scale
    rk = _rnorm(kx, NORM)
    gam = tl.cumsum(_load_vec(g + t0 * HV + hv, HV, n, BT), 0)
    P = _mm_rr(qx, tl.trans(kx), tl.zeros([BT, BT], dtype=tl.float32))
    P = P * (rq[:, None] * rk[None, :]) * tl.exp(tl.where(ii >= jj, gam[:, None] - gam[None, :], float("-inf")))
    if D_F16:
        p16 = P.to(tl.float16)
    else:
        ph, pl = _split(P)
    qs = rq * tl.exp(gam)
    s_base = (chunk * HV + hv) * K * V
    hvv = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        sh = _load(s_hi + s_base + iv * BV, V, K, cols, BK, BV)
        dh = _load(d_hi + hvv + iv * BV, HV * V, n, cols, BT, BV)
        if not D_F16:
            dl = _load(d_lo + hvv + iv * BV, HV * V, n, cols, BT, BV)
        if OUT_TERMS == 1:
            out = qs[:, None] * _dot(qx, sh, tl.zeros([BT, BV], dtype=tl.float32))
        else:
            sl = _load(s_lo + s_base + iv * BV, V, K, cols, BK, BV)
            out = qs[:, None] * _mm_rs(qx, sh, sl, tl.zeros([BT, BV], dtype=tl.float32))
        if D_F16:
            col = iv * BV + tl.arange(0, BV)
            ed = tl.load(d_scale + (chunk * HV + hv) * tl.cdiv(V, D_BV) + col // D_BV, mask=col < V, other=0.0)
            out += _dot(p16, dh, tl.zeros([BT, BV], dtype=tl.float32)) * ed[None, :]
        else:
            out = _mm_ss(ph, pl, dh, dl, out)
        _store(o + hvv + iv * BV, HV * V, n, cols, out, BT, BV)


@triton.jit
def _state_bwd_kernel(
    q, k, w_hi, w_lo, decay, kscale, qscale, do, dvl, dht, ds_hi, ds_lo, dd_hi, dd_lo, dh0, w16, k16, q16, dvl_scale,
    cu_seqlens, chunk_offsets,
    H, HV, K, V, SQK, SV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DD_TERMS: tl.constexpr = 2, W_TERMS: tl.constexpr = 2,
    F16: tl.constexpr = False, PREP_BV: tl.constexpr = 64, ds_scale=None, STORE_F16: tl.constexpr = False,
    do16=None, do_scale=None,
):
    """Per (sequence, value head, V tile): the reverse pass over chunks.

    With dS the gradient of the state leaving the chunk (stored split in ds_hi/ds_lo[chunk]):
        dDelta = P^T dO + kscale * (k dS)                     (P^T dO precomputed in dvl)
        dS    <- e^gamma_C dS + q^T (qscale * dO) - W^T dDelta
    F16 = True (as in `_state_fwd_kernel`): the three products of a step take one float16 term of
    each operand: kscale * k, qscale * q and W as the prepare kernel stored them (k16, q16, w16),
    dS and dDelta scaled by a power of two per tile, dO as the prepare kernel stored it (do16, with
    its scales per tile of PREP_BV columns in do_scale). 3 matmuls a step instead of 7; dDelta and
    dS are still stored split. DD_TERMS, W_TERMS, w_hi and w_lo are then unused. P^T dO comes in
    float16 too (dvl, with the prepare kernel's scales per tile of PREP_BV columns in dvl_scale):
    half the shared memory of its float32 tile, so that two programs of V tile 32 fit an SM.
    STORE_F16 (with F16): dS stored as the pass multiplies it, float16 in ds_hi and its scale per V
    tile in ds_scale, as in `_state_fwd_kernel` (ds_lo is not written).
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    h = hv // (HV // H)
    bos, eos, c0, num_chunks = _sequence_chunks(n, cu_seqlens, chunk_offsets, BT)
    cols = V - iv * BV
    kv = K * V

    if HAS_DHT:
        dS = _load(dht + (n * HV + hv) * kv + iv * BV, V, K, cols, BK, BV).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    next_decay = tl.load(decay + (c0 + num_chunks - 1) * HV + hv, mask=num_chunks > 0, other=1.0)
    for step in range(0, num_chunks):
        c = num_chunks - 1 - step
        chunk_decay = next_decay  # e^gamma_C, from the prepare kernel, read a step ahead
        next_decay = tl.load(decay + (c0 + tl.maximum(c - 1, 0)) * HV + hv)
        s_off = ((c0 + c) * HV + hv) * kv + iv * BV
        if STORE_F16:
            # dS * inv_es, not dS * (1 / es) as below: the same value computed apart, so that it is
            # not stored from the matmul operand's layout (4 KB more shared memory: one program
            # per SM instead of two at V tile 32).
            es, inv_es = _f16_scale(dS)
            _store(ds_hi + s_off, V, K, cols, dS * inv_es, BK, BV)
            tl.store(ds_scale + ((c0 + c) * HV + hv) * tl.cdiv(V, BV) + iv, es)
        else:
            sh, sl = _split(dS)
            _store(ds_hi + s_off, V, K, cols, sh, BK, BV)
            _store(ds_lo + s_off, V, K, cols, sl, BK, BV)
        t0 = bos + c * BT
        rows = tl.minimum(eos - t0, BT).to(tl.int32)
        hk = (t0 * HV + hv) * K
        qk = t0 * SQK + h * K
        hvv = (t0 * HV + hv) * V + iv * BV
        local = _load(dvl + hvv, HV * V, rows, cols, BT, BV).to(tl.float32)
        if F16:
            col = iv * BV + tl.arange(0, BV)
            scale_at = ((c0 + c) * HV + hv) * tl.cdiv(V, PREP_BV) + col // PREP_BV
            local = local * tl.load(dvl_scale + scale_at, mask=col < V, other=0.0)[None, :]
        else:
            dox = _load(do + hvv, HV * V, rows, cols, BT, BV).to(tl.float32)
        if F16:
            if not STORE_F16:
                es, _ = _f16_scale(dS)
            ds16 = (dS * (1.0 / es)).to(tl.float16)
            ddelta = local + _dot(_load(k16 + hk, HV * K, rows, K, BT, BK), ds16, tl.zeros([BT, BV], dtype=tl.float32)) * es
            _store_split(dd_hi, dd_lo, hvv, HV * V, rows, cols, ddelta, BT, BV)
            # dO in float16 with a scale per prepare tile: per column here (not contracted). A no-op
            # select (rows past the end are already 0), here: the matmul operand goes through
            # registers and is staged in shared memory only while used (a pipelined tile would take
            # 4 KB more, 116 KB: one program per SM).
            o16 = _load(do16 + hvv, HV * V, rows, cols, BT, BV)
            o16 = tl.where(tl.arange(0, BT)[:, None] < rows, o16, 0.0).to(tl.float16)
            eo = tl.load(do_scale + scale_at, mask=col < V, other=0.0)
            qt = tl.trans(_load(q16 + hk, HV * K, rows, K, BT, BK))
            dS = _dot(qt, o16, tl.zeros([BK, BV], dtype=tl.float32)) * eo[None, :] + dS * chunk_decay
            dd16, ed = _f16_scaled(ddelta)
            wt = tl.trans(_load(w16 + hk, HV * K, rows, K, BT, BK))
            dS -= _dot(wt, dd16, tl.zeros([BK, BV], dtype=tl.float32)) * ed
        else:
            kx = _load(k + qk, SQK, rows, K, BT, BK)
            qx = _load(q + qk, SQK, rows, K, BT, BK)
            wh = _load(w_hi + hk, HV * K, rows, K, BT, BK)
            ks = _load_vec(kscale + t0 * HV + hv, HV, rows, BT)
            qs = _load_vec(qscale + t0 * HV + hv, HV, rows, BT)
            ddelta = local + ks[:, None] * _mm_rs(kx, sh, sl, tl.zeros([BT, BV], dtype=tl.float32))
            _store_split(dd_hi, dd_lo, hvv, HV * V, rows, cols, ddelta, BT, BV)
            oh, ol = _split(dox * qs[:, None])
            dS = _mm_rs(tl.trans(qx), oh, ol, dS * chunk_decay)
            # W^T dDelta; DD_TERMS / W_TERMS = 1 drop dDelta's / W's lo term (dh0 within about 1e-3).
            ddh, ddl = _split(-ddelta)
            dS = _dot(tl.trans(wh), ddh, dS)
            if W_TERMS == 2:
                dS = _dot(tl.trans(_load(w_lo + hk, HV * K, rows, K, BT, BK)), ddh, dS)
            if DD_TERMS == 2:
                dS = _dot(tl.trans(wh), ddl, dS)
    if STORE_DH0:
        _store(dh0 + (n * HV + hv) * kv + iv * BV, V, K, cols, dS, BK, BV)


@triton.jit
def _grad_local_kernel(
    q, k, v, g, beta, t_hi, t_lo, d_hi, d_lo, dd_hi, dd_lo, do, scratch,
    dv, dvb_out, dq_part, dk_part, dbeta_part, dgam_part,
    cu_seqlens, chunk_seq, chunk_local,
    scale, H, HV, K, V, SQK, SV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, TERMS: tl.constexpr = 2, max_d_out=None, max_b_out=None, ROWMAX: tl.constexpr = False,
):
    """Per (chunk slot, value head), the gradients within the chunk (first of two kernels).

    With dVb = T^T dDelta (the gradient of diag(beta) v; stored in dvb_out [NTOK, HV, V] float32 for
    `_grad_state_kernel`), contracted over V tile by tile:
    dP = dO Delta^T (P = Q K^T * Gamma) and dA = -dVb Delta^T (A = diag(beta) K K^T * Gamma; from
    dA = -T^T dT T^T, as U - W S = Delta). With dPm = dP * Gamma and dM = dA * Gamma * beta (the
    gradient of K K^T), stores dv and the parts

        dq_part = scale dPm K      dk_part = dPm^T Q + (dM + dM^T) K

    of the gradients of the normalised q and k ([NTOK, HV, K] float32), and the parts of dbeta and
    dgamma (the gradient of the within-chunk cumsum gamma) these give. scratch: [slots, HV, BT, BT]
    float32, to transpose dPm and dM. TERMS = 1 (bf16 inputs only) takes one bf16 term of Delta,
    dDelta, dVb, dPm and dM in their matmuls (T keeps two); d_lo and dd_lo are not read.
    ROWMAX: also stores the largest |entry| of each row of Delta and dVb in max_d_out and max_b_out
    ([NTOK, HV] float32), for the float16 scales of `_grad_state_kernel`.
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n = _chunk_bounds(slot, chunk_seq, chunk_local, cu_seqlens, BT)
    if seq < 0:
        return
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    ii = o_t[:, None]
    jj = o_t[None, :]
    gam = tl.cumsum(_load_vec(g + t0 * HV + hv, HV, n, BT), 0)
    bv = _load_vec(beta + t0 * HV + hv, HV, n, BT)
    t_base = (t0 * HV + hv) * BT
    # T^T, loaded transposed: tt[a, b] = T[b, a].
    tth = _load_t(t_hi + t_base, HV * BT, n, BT, BT, BT)
    ttl = _load_t(t_lo + t_base, HV * BT, n, BT, BT, BT)

    acc_p = tl.zeros([BT, BT], dtype=tl.float32)  # dO Delta^T
    acc_a = tl.zeros([BT, BT], dtype=tl.float32)  # dVb Delta^T  (dA = -acc_a)
    dbeta_acc = tl.zeros([BT], dtype=tl.float32)
    if ROWMAX:
        max_d = tl.zeros([BT], dtype=tl.float32)
        max_b = tl.zeros([BT], dtype=tl.float32)
    hvv = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        base = hvv + iv * BV
        ddh = _load(dd_hi + base, HV * V, n, cols, BT, BV)
        dox = _load(do + base, HV * V, n, cols, BT, BV)
        vx = _load(v + t0 * SV + hv * V + iv * BV, SV, n, cols, BT, BV)
        if TERMS == 1:
            dvb = _mm_sr(tth, ttl, ddh, tl.zeros([BT, BV], dtype=tl.float32))
        else:
            ddl = _load(dd_lo + base, HV * V, n, cols, BT, BV)
            dvb = _mm_ss(tth, ttl, ddh, ddl, tl.zeros([BT, BV], dtype=tl.float32))
        _store(dv + base, HV * V, n, cols, dvb * bv[:, None], BT, BV)
        _store(dvb_out + base, HV * V, n, cols, dvb, BT, BV)
        dbeta_acc += tl.sum(dvb * vx.to(tl.float32), 1)
        if TERMS == 1:
            dh = _load(d_hi + base, HV * V, n, cols, BT, BV)
            acc_p = _dot(dox, tl.trans(dh), acc_p)
            acc_a = _dot(_bf16(dvb), tl.trans(dh), acc_a)
        else:
            dh = _load(d_hi + base, HV * V, n, cols, BT, BV)
            dl = _load(d_lo + base, HV * V, n, cols, BT, BV)
            acc_p = _mm_rs(dox, tl.trans(dh), tl.trans(dl), acc_p)
            vbh, vbl = _split(dvb)
            acc_a = _mm_ss(vbh, vbl, tl.trans(dh), tl.trans(dl), acc_a)
        if ROWMAX:  # Delta's hi term: within 2^-8 of |Delta| (the scales leave a factor 4 of room)
            max_d = tl.maximum(max_d, tl.max(tl.abs(dh.to(tl.float32)), 1))
            max_b = tl.maximum(max_b, tl.max(tl.abs(dvb), 1))

    # In an order that keeps few [BT, *] tiles live at once (registers).
    decay_incl = tl.exp(tl.where(ii >= jj, gam[:, None] - gam[None, :], float("-inf")))
    dPm = acc_p * decay_incl
    dAd = -acc_a * tl.where(ii > jj, decay_incl, 0.0)
    qk_base = t0 * SQK + h * K
    hk = (t0 * HV + hv) * K
    qx = _load(q + qk_base, SQK, n, K, BT, BK)
    kx = _load(k + qk_base, SQK, n, K, BT, BK)
    rq = _rnorm(qx, NORM)
    rk = _rnorm(kx, NORM)
    # E = dP * P + dA * A: the gradient of the exponents gamma_i - gamma_j; dgamma_i gets its row
    # sums less its column sums, taken part by part.
    E = dPm * _mm_rr(qx, tl.trans(kx), tl.zeros([BT, BT], dtype=tl.float32)) * ((rq * scale)[:, None] * rk[None, :])
    dgam_acc = tl.sum(E, 1) - tl.sum(E, 0)
    kk = _mm_rr(kx, tl.trans(kx), tl.zeros([BT, BT], dtype=tl.float32)) * (rk[:, None] * rk[None, :])
    dM = dAd * bv[:, None]
    E = dM * kk
    dgam_acc += tl.sum(E, 1) - tl.sum(E, 0)
    dbeta_acc += tl.sum(dAd * kk, 1)
    tile = scratch + (slot.to(tl.int64) * HV + hv) * BT * BT
    tl.store(tile + ii * BT + jj, dPm)
    ph, pl = _split(dPm * (scale * rk)[None, :])
    _store(dq_part + hk, HV * K, n, K, _mm_sr_t(ph, pl, kx, tl.zeros([BT, BK], dtype=tl.float32), TERMS), BT, BK)
    tl.debug_barrier()
    pt = tl.load(tile + jj * BT + ii)  # dPm^T
    tl.debug_barrier()
    tl.store(tile + ii * BT + jj, dM)
    tl.debug_barrier()
    dms = dM + tl.load(tile + jj * BT + ii)  # dM + dM^T
    ph, pl = _split(pt * (rq * scale)[None, :])
    dK = _mm_sr_t(ph, pl, qx, tl.zeros([BT, BK], dtype=tl.float32), TERMS)
    mh, ml = _split(dms * rk[None, :])
    dK = _mm_sr_t(mh, ml, kx, dK, TERMS)
    _store(dk_part + hk, HV * K, n, K, dK, BT, BK)
    tl.store(dbeta_part + t0 * HV + hv + o_t * HV, dbeta_acc, mask=o_t < n)
    tl.store(dgam_part + t0 * HV + hv + o_t * HV, dgam_acc, mask=o_t < n)
    if ROWMAX:
        tl.store(max_d_out + t0 * HV + hv + o_t * HV, max_d, mask=o_t < n)
        tl.store(max_b_out + t0 * HV + hv + o_t * HV, max_b, mask=o_t < n)


@triton.jit
def _grad_q_kernel(
    q, g, s_hi, s_lo, do, dq_state, dgam_q,
    cu_seqlens, chunk_seq, chunk_local, chunk_offsets,
    scale, H, HV, K, V, SQK,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, TERMS: tl.constexpr = 2, s_scale=None, F16: tl.constexpr = False,
    S_BV: tl.constexpr = 64,
):
    """Per (chunk slot, value head), the gradient of q through the states, which needs neither the
    reverse pass nor `_grad_local_kernel` (on a GPU it runs beside the reverse pass):

        dQd = dO S^T    dq_state = scale e^gamma dQd    dgam_q_i = e^gamma_i <Q_i, dQd_i>

    (O = diag(e^gamma) Q S + ...; dq_state [NTOK, HV, K], dgam_q [NTOK, HV] float32, the parts of
    the gradients of the normalised q and of gamma; <q_i, dQd_i> from dQd accumulated unscaled, so
    no division by a decay). TERMS = 1: S's hi term only. F16: S in float16 with its scale per V
    tile of S_BV columns, as the forward state pass stored it (`_state_fwd_kernel`'s STORE_F16),
    and dO's tiles scaled by a power of two per row.
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n, chunk = _slot_bounds(slot, chunk_seq, chunk_local, cu_seqlens, chunk_offsets, 0, BT, False)
    if seq < 0:
        return
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    eg = tl.exp(tl.cumsum(_load_vec(g + t0 * HV + hv, HV, n, BT), 0))
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    s_base = (chunk * HV + hv) * K * V
    hvv = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        sh = _load(s_hi + s_base + iv * BV, V, K, cols, BK, BV)
        dox = _load(do + hvv + iv * BV, HV * V, n, cols, BT, BV)
        if F16:
            es = tl.load(s_scale + (chunk * HV + hv) * tl.cdiv(V, S_BV) + (iv * BV) // S_BV)
            xf = dox.to(tl.float32)
            eo = _pow2_scale(tl.max(tl.abs(xf), 1))
            o16 = (xf * (1.0 / eo)[:, None]).to(tl.float16)
            acc += _dot(o16, tl.trans(sh), tl.zeros([BT, BK], dtype=tl.float32)) * (eo * es)[:, None]
        elif TERMS == 1:
            acc = _dot(dox, tl.trans(sh), acc)
        else:
            acc = _mm_rs(dox, tl.trans(sh), tl.trans(_load(s_lo + s_base + iv * BV, V, K, cols, BK, BV)), acc)
    qx = _load(q + t0 * SQK + h * K, SQK, n, K, BT, BK)
    r_q = tl.sum(qx.to(tl.float32) * acc, 1)  # <q_i, dQd_i> = <dO_i, (q S)_i>
    hk = (t0 * HV + hv) * K
    _store(dq_state + hk, HV * K, n, K, (scale * eg)[:, None] * acc, BT, BK)
    tl.store(dgam_q + t0 * HV + hv + o_t * HV, (eg * scale) * _rnorm(qx, NORM) * r_q, mask=o_t < n)


@triton.jit
def _grad_state_kernel(
    q, k, g, beta, s_hi, s_lo, ds_hi, ds_lo, d_hi, d_lo, dvb_in,
    dq_part, dk_part, dbeta_part, dgam_part, dq_state, dgam_q,
    dq_hat, dk_hat, dbeta, dg,
    cu_seqlens, chunk_seq, chunk_local, chunk_offsets,
    scale, H, HV, K, V, SQK, SV,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, TERMS: tl.constexpr = 2,
    s_scale=None, ds_scale=None, max_d=None, max_b=None, F16: tl.constexpr = False,
    S_BV: tl.constexpr = 64, DS_BV: tl.constexpr = 64, FUSE_NORM: tl.constexpr = False,
):
    """Per (chunk slot, value head), the gradients through the states (after `_grad_local_kernel`
    and `_grad_q_kernel`), and the sums.

    Inputs: the chunk-entry state S, the gradient dS' of the state leaving the chunk, Delta from
    the forward pass, dVb = T^T dDelta and the parts from `_grad_local_kernel` and
    `_grad_q_kernel`. Contracted over V tile by tile:

        Z = diag(e^(gamma_C - gamma)) Delta dS'^T - diag(beta e^gamma) dVb S^T

    Z is the gradient of K through the state update (Kd = diag(e^(gamma_C - gamma)) K) and through
    W = T diag(beta e^gamma) K (dKb = T^T dW = -dVb S^T). Stores dq_hat = dq_part + dq_state and
    dk_hat = dk_part + Z ([NTOK, HV, K] float32, the gradients of the normalised q and k;
    `_qk_norm_bwd_kernel` goes back through the norms), dbeta, and dg = the reverse within-chunk
    cumsum of dgamma. The row sums the gate and beta gradients need come from the products k S and
    k dS' inside the loop. TERMS = 1 (bf16 inputs only) takes one bf16 term of S, dS', Delta and
    the computed operands in the matmuls (s_lo, ds_lo and d_lo are not read).
    F16 (bf16 inputs with the L2 norm): S and dS' come as the state passes multiplied them, float16
    with a power-of-two scale per V tile of S_BV / DS_BV columns (s_scale, ds_scale; BV divides
    both), and every product takes one float16 term per operand: k as its normalised rows r_k k,
    and the tiles of Delta and dVb (times their row factors and the states' tile scales) scaled by
    one power of two per row for all V tiles, set from the rows' largest entries (max_d, max_b from
    `_grad_local_kernel`) and the largest tile scales, so that the matmuls accumulate in place (a
    float16 normal spans 2^29: a tile scaled far below the largest keeps its bits). 4 matmuls per
    V tile instead of 10, half the state bytes.
    FUSE_NORM (HV == H): also goes back through the q/k L2 norms, as `_qk_norm_bwd_kernel` does,
    and stores dq, dk in the inputs' dtype in dq_hat, dk_hat ([NTOK, H, K]).
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n, chunk = _slot_bounds(slot, chunk_seq, chunk_local, cu_seqlens, chunk_offsets, 0, BT, False)
    if seq < 0:
        return
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    gv = _load_vec(g + t0 * HV + hv, HV, n, BT)
    bv = _load_vec(beta + t0 * HV + hv, HV, n, BT)
    gam = tl.cumsum(gv, 0)
    gam_last = tl.sum(gv, 0)
    eg = tl.exp(gam)
    to_end = tl.exp(gam_last - gam)
    bek = bv * eg
    qk_base = t0 * SQK + h * K
    hk = (t0 * HV + hv) * K
    kx = _load(k + qk_base, SQK, n, K, BT, BK)
    if F16:
        kn16 = (kx.to(tl.float32) * _rnorm(kx, NORM)[:, None]).to(tl.float16)
        ms = 0.0
        for t in range(0, tl.cdiv(V, S_BV)):
            ms = tl.maximum(ms, tl.load(s_scale + (chunk * HV + hv) * tl.cdiv(V, S_BV) + t))
        mds = 0.0
        for t in range(0, tl.cdiv(V, DS_BV)):
            mds = tl.maximum(mds, tl.load(ds_scale + (chunk * HV + hv) * tl.cdiv(V, DS_BV) + t))
        # One power of two per row: acc_z in units of fz.
        fz = _pow2_scale(tl.maximum(_load_vec(max_d + t0 * HV + hv, HV, n, BT) * to_end * mds,
                                    _load_vec(max_b + t0 * HV + hv, HV, n, BT) * bek * ms))
        inv_z = 1.0 / fz
        acc_z = tl.zeros([BT, BK], dtype=tl.float32)
    else:
        acc_z = _load(dk_part + hk, HV * K, n, K, BT, BK)  # + Z
    r_kd = tl.zeros([BT], dtype=tl.float32)  # rowsum(Delta * (k dS'))
    r_kb = tl.zeros([BT], dtype=tl.float32)  # rowsum(dVb * (k S))
    state_dot = tl.zeros([BK], dtype=tl.float32)  # <S, dS'> by rows of S
    s_base = (chunk * HV + hv) * K * V
    hvv = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        base = hvv + iv * BV
        sh = _load(s_hi + s_base + iv * BV, V, K, cols, BK, BV)
        dsh = _load(ds_hi + s_base + iv * BV, V, K, cols, BK, BV)
        delta = _load(d_hi + base, HV * V, n, cols, BT, BV).to(tl.float32)
        dvb = _load(dvb_in + base, HV * V, n, cols, BT, BV)
        if F16:
            delta += _load(d_lo + base, HV * V, n, cols, BT, BV).to(tl.float32)
            es = tl.load(s_scale + (chunk * HV + hv) * tl.cdiv(V, S_BV) + (iv * BV) // S_BV)
            eds = tl.load(ds_scale + (chunk * HV + hv) * tl.cdiv(V, DS_BV) + (iv * BV) // DS_BV)
            acc_z = _dot((delta * (to_end * eds * inv_z)[:, None]).to(tl.float16), tl.trans(dsh), acc_z)
            acc_z = _dot((dvb * (-bek * es * inv_z)[:, None]).to(tl.float16), tl.trans(sh), acc_z)
            # With k's normalised rows: r_kd, r_kb times r_k.
            r_kd += tl.sum(delta * _dot(kn16, dsh, tl.zeros([BT, BV], dtype=tl.float32)), 1) * eds
            r_kb += tl.sum(dvb * _dot(kn16, sh, tl.zeros([BT, BV], dtype=tl.float32)), 1) * es
            state_dot += tl.sum(sh.to(tl.float32) * dsh.to(tl.float32), 1) * (es * eds)
        elif TERMS == 1:
            acc_z = _dot(_bf16(delta * to_end[:, None]), tl.trans(dsh), acc_z)
            acc_z = _dot(_bf16(dvb * (-bek)[:, None]), tl.trans(sh), acc_z)
            r_kd += tl.sum(delta * _dot(kx, dsh, tl.zeros([BT, BV], dtype=tl.float32)), 1)
            r_kb += tl.sum(dvb * _dot(kx, sh, tl.zeros([BT, BV], dtype=tl.float32)), 1)
            state_dot += tl.sum(sh.to(tl.float32) * dsh.to(tl.float32), 1)
        else:
            sl = _load(s_lo + s_base + iv * BV, V, K, cols, BK, BV)
            dsl = _load(ds_lo + s_base + iv * BV, V, K, cols, BK, BV)
            delta += _load(d_lo + base, HV * V, n, cols, BT, BV).to(tl.float32)
            ah, al = _split(delta * to_end[:, None])
            acc_z = _mm_ss(ah, al, tl.trans(dsh), tl.trans(dsl), acc_z)
            ah, al = _split(dvb * (-bek)[:, None])
            acc_z = _mm_ss(ah, al, tl.trans(sh), tl.trans(sl), acc_z)
            r_kd += tl.sum(delta * _mm_rs(kx, dsh, dsl, tl.zeros([BT, BV], dtype=tl.float32)), 1)
            r_kb += tl.sum(dvb * _mm_rs(kx, sh, sl, tl.zeros([BT, BV], dtype=tl.float32)), 1)
            state_dot += tl.sum((sh.to(tl.float32) + sl.to(tl.float32)) * (dsh.to(tl.float32) + dsl.to(tl.float32)), 1)

    if F16:
        acc_z = _load(dk_part + hk, HV * K, n, K, BT, BK) + fz[:, None] * acc_z
    kx = _load(k + qk_base, SQK, n, K, BT, BK)
    rk = _rnorm(kx, NORM)
    if FUSE_NORM:
        acc_z = _norm_bwd(kx, acc_z, NORM)
    _store(dk_hat + hk, HV * K, n, K, acc_z, BT, BK)
    acc_q = _load(dq_part + hk, HV * K, n, K, BT, BK) + _load(dq_state + hk, HV * K, n, K, BT, BK)
    if FUSE_NORM:
        acc_q = _norm_bwd(_load(q + qk_base, SQK, n, K, BT, BK), acc_q, NORM)
    _store(dq_hat + hk, HV * K, n, K, acc_q, BT, BK)
    dgam = _load_vec(dgam_part + t0 * HV + hv, HV, n, BT) + _load_vec(dgam_q + t0 * HV + hv, HV, n, BT)
    # State passed on: S' = e^gamma_C S + Kd^T Delta; W = T diag(beta e^gamma) K.
    if F16:  # r_kd, r_kb came times r_k
        dto_end = to_end * r_kd
        kdkb = -r_kb  # <K_j, dKb_j>
    else:
        dto_end = to_end * rk * r_kd
        kdkb = -rk * r_kb
    dgam += bek * kdkb - dto_end
    dgam_last = tl.sum(dto_end, 0) + tl.exp(gam_last) * tl.sum(state_dot, 0)
    # gamma_C is gamma at the last real row (padded rows have g = 0): its gradient goes there.
    dgam += tl.where(o_t == n - 1, dgam_last, 0.0)
    # gamma is a within-chunk cumsum of g: dg_j = sum_{i >= j} dgamma_i.
    dgv = tl.sum(dgam, 0) - tl.cumsum(dgam, 0) + dgam
    dbeta_v = _load_vec(dbeta_part + t0 * HV + hv, HV, n, BT) + eg * kdkb
    tl.store(dbeta + t0 * HV + hv + o_t * HV, dbeta_v, mask=o_t < n)
    tl.store(dg + t0 * HV + hv + o_t * HV, dgv, mask=o_t < n)


@triton.jit
def _norm_bwd(x, dx_hat, NORM: tl.constexpr):
    """The gradient of a raw tile x [R, C] from that of its normalised rows x_hat = r x (float32):
    dx = r (dx_hat - x_hat (x_hat . dx_hat)); dx_hat itself without normalisation."""
    if NORM:
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, 1) + 1e-6)
        dx_hat = (dx_hat - xf * (r * r * tl.sum(xf * dx_hat, 1))[:, None]) * r[:, None]
    return dx_hat


@triton.jit
def _qk_norm_bwd_kernel(
    q, k, dq_hat, dk_hat, dq, dk,
    NTOK, H, HV, K, SQK,
    BT: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
):
    """Per (block of BT tokens, q/k head): sum the value heads' dq_hat, dk_hat ([NTOK, HV, K] float32)
    over the group, go back through the L2 norm (x_hat = x r: dx = r (dx_hat - x_hat (x_hat . dx_hat)))
    and store dq, dk [NTOK, H, K] in the inputs' dtype.
    """
    t0 = tl.program_id(0).to(tl.int64) * BT
    h = tl.program_id(1)
    n = tl.minimum(NTOK - t0, BT).to(tl.int32)
    group = HV // H
    for which in tl.static_range(2):
        if which == 0:
            x_ptr, dx_hat, dx = q, dq_hat, dq
        else:
            x_ptr, dx_hat, dx = k, dk_hat, dk
        acc = tl.zeros([BT, BK], dtype=tl.float32)
        for j in range(0, group):
            acc += _load(dx_hat + (t0 * HV + h * group + j) * K, HV * K, n, K, BT, BK)
        if NORM:
            acc = _norm_bwd(_load(x_ptr + t0 * SQK + h * K, SQK, n, K, BT, BK), acc, NORM)
        _store(dx + (t0 * H + h) * K, H * K, n, K, acc, BT, BK)
