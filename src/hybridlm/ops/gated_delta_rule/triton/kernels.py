"""Triton kernels of the chunked gated delta rule (chunk C = 64), forward and backward.

Notation per value head and chunk (rows i, j = 0..C-1), as in `hybridlm.ops.gated_delta_rule.chunk`:
Q the scaled L2-normalised queries, K the normalised keys, V the values, gamma the within-chunk
cumulative log decay, Gamma_ij = exp(gamma_i - gamma_j) for i >= j (0 above), S the chunk-entry
state [K, V]:

    A = strictly_lower(diag(beta) K K^T * Gamma),  T = (I + A)^-1
    W = T diag(beta e^gamma) K,  U = T diag(beta) V,  Delta = U - W S
    O = diag(e^gamma) Q S + (Q K^T * Gamma) Delta
    S_next = e^gamma_C S + Kd^T Delta,  Kd = diag(e^(gamma_C - gamma)) K

Forward: `_prepare_kernel` (per chunk: gamma, A, T, W, U, Kd), `_state_fwd_kernel` (per sequence,
value head and V tile: the sequential pass, chunk-entry states and Delta), `_output_kernel` (per
chunk: O). Backward recomputes all of that, then `_state_bwd_kernel` runs the reverse pass for the
state gradients and dDelta, and `_grad_kernel` gives dq, dk, dv, dbeta and dg per chunk.

Numerics: every exponent is masked before exp and is <= 0 for g <= 0 (no division by a decay); the
cumulative gates, A, T and the carried states are float32. The L2 norms of q and k are recomputed
from the raw inputs wherever they are needed instead of being stored.

Hopper + Triton 3.4..3.7.0 miscompile `tl.trans` of a dot result used as a dot operand (fla #640):
these kernels never transpose a computed matrix in registers. A transposed operand is either
loaded transposed from memory or, for the one computed matrix needed both ways (dM in the UT
backward), written to a per-program scratch tile and read back transposed.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter multiplies bf16 blocks wrongly (Triton 3.9 reads their bits as integers), so
    # operands are rounded to bf16 and multiplied in float32: the GPU's bf16 dot gives the same
    # numbers, as it accumulates in float32. Matmuls are otherwise exact float32 in the interpreter;
    # HYBRIDLM_EMULATE_TF32=1 truncates "tf32" operands to 10 mantissa bits as the GPU does, to
    # study the GPU's rounding on the CPU.
    _EMULATE_TF32 = os.environ.get("HYBRIDLM_EMULATE_TF32") == "1"

    @triton.jit
    def _to_tf32(x):
        return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr):
        if _EMULATE_TF32 and PREC == "tf32":
            return tl.dot(_to_tf32(a.to(tl.float32)), _to_tf32(b.to(tl.float32)))
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
        if LOWP:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
        else:
            return _dot(a, b, PREC)

else:

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr):
        """a @ b on float32 operands with float32 accumulation, at matrix-unit precision PREC."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
        """a @ b with float32 accumulation: bf16 operands when LOWP, else float32 operands at PREC."""
        if LOWP:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _unit_lower_inverse(A, BT: tl.constexpr, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular A [BT, BT] (float32), by doubling the block size.

    With T the inverse of the block diagonal of (I + A) in blocks of size h, the inverse in blocks of
    2h is T - T C T, C the part of A in the lower-left h x h quadrant of each 2h block
    ([[X, 0], [C, Y]]^-1 = [[X^-1, 0], [-Y^-1 C X^-1, Y^-1]]). Exact block forward substitution:
    no power series, so no growth-and-cancellation when beta is near 2.
    """
    ii = tl.arange(0, BT)[:, None]
    jj = tl.arange(0, BT)[None, :]
    inv = tl.where(ii == jj, 1.0, 0.0) - tl.where((ii // 2) == (jj // 2), A, 0.0)
    for level in tl.static_range(2, LOG2_BT + 1):
        same_block = (ii >> level) == (jj >> level)
        other_half = (ii >> (level - 1)) != (jj >> (level - 1))
        corner = tl.where(same_block & other_half, A, 0.0)
        inv = inv - _dot(_dot(inv, corner, PREC), inv, PREC)
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
def _store(base, stride, n_rows, n_cols, value, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(base + r[:, None] * stride + c[None, :], value.to(base.dtype.element_ty),
             mask=(r[:, None] < n_rows) & (c[None, :] < n_cols))


@triton.jit
def _load_vec(base, stride, n, R: tl.constexpr):
    r = tl.arange(0, R)
    return tl.load(base + r * stride, mask=r < n, other=0.0).to(tl.float32)


@triton.jit
def _unit_rows(base, stride, n_rows, K, BT: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """Rows [BT, BK] of q or k in float32, L2-normalised when NORM; also the rsqrt norms [BT]."""
    val = _load(base, stride, n_rows, K, BT, BK).to(tl.float32)
    if NORM:
        rnorm = tl.rsqrt(tl.sum(val * val, 1) + 1e-6)
    else:
        rnorm = tl.full([BT], 1.0, tl.float32)
    return val * rnorm[:, None], rnorm


@triton.jit
def _unit_cols(base, stride, n_rows, K, BT: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """The transpose [BK, BT] of `_unit_rows`' tile, loaded transposed from memory."""
    val = _load_t(base, stride, n_rows, K, BT, BK).to(tl.float32)
    if NORM:
        val = val * tl.rsqrt(tl.sum(val * val, 0) + 1e-6)[None, :]
    return val


@triton.jit
def _prepare_kernel(
    q, k, v, g, beta, do,
    w, u, kd, qd, tmat, dvl,
    cu_seqlens, chunk_seq, chunk_local,
    scale, H, HV,
    K, V,
    BT: tl.constexpr, LOG2_BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, BACKWARD: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr, INV_PREC: tl.constexpr,
):
    """Per (chunk slot, value head): W, U, Kd; in BACKWARD mode also T, Qd = e^gamma Q and P^T dO.

    w, kd, qd: [NTOK, HV, K]; u, dvl: [NTOK, HV, V]; tmat: [NTOK, HV, BT] (row i of the chunk's T).
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
    qk_base = (t0 * H + h) * K
    qk_stride = H * K

    kr, _ = _unit_rows(k + qk_base, qk_stride, n, K, BT, BK, NORM)
    kc = _unit_cols(k + qk_base, qk_stride, n, K, BT, BK, NORM)
    gv = _load_vec(g + t0 * HV + hv, HV, n, BT)
    bv = _load_vec(beta + t0 * HV + hv, HV, n, BT)
    # Padded rows have g = 0, so gamma there equals gamma at the last real row (= gamma_C).
    gam = tl.cumsum(gv, 0)
    gam_last = tl.sum(gv, 0)

    kk = _dot(kr, kc, INV_PREC)
    A = bv[:, None] * kk * tl.exp(tl.where(ii > jj, gam[:, None] - gam[None, :], float("-inf")))
    T = _unit_lower_inverse(A, BT, LOG2_BT, INV_PREC)

    hk_base = (t0 * HV + hv) * K
    hk_stride = HV * K
    _store(w + hk_base, hk_stride, n, K, _dot(T, kr * (bv * tl.exp(gam))[:, None], PREC), BT, BK)
    _store(kd + hk_base, hk_stride, n, K, kr * tl.exp(gam_last - gam)[:, None], BT, BK)

    if BACKWARD:
        qr, _ = _unit_rows(q + qk_base, qk_stride, n, K, BT, BK, NORM)
        qc = _unit_cols(q + qk_base, qk_stride, n, K, BT, BK, NORM)
        _store(qd + hk_base, hk_stride, n, K, qr * (scale * tl.exp(gam))[:, None], BT, BK)
        _store(tmat + (t0 * HV + hv) * BT, HV * BT, n, BT, T, BT, BT)
        # P^T[j, i] = q_i . k_j Gamma_ij for i >= j, built directly in transposed form.
        PT = _dot(kr, qc, PREC) * scale
        PT = PT * tl.exp(tl.where(jj >= ii, gam[None, :] - gam[:, None], float("-inf")))

    hv_base = (t0 * HV + hv) * V
    hv_stride = HV * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        vx = _load(v + hv_base + iv * BV, hv_stride, n, cols, BT, BV).to(tl.float32)
        _store(u + hv_base + iv * BV, hv_stride, n, cols, _dot(T, vx * bv[:, None], PREC), BT, BV)
        if BACKWARD:
            dox = _load(do + hv_base + iv * BV, hv_stride, n, cols, BT, BV)
            _store(dvl + hv_base + iv * BV, hv_stride, n, cols, _mm(PT, dox, LOWP, PREC), BT, BV)


@triton.jit
def _state_fwd_kernel(
    w, u, kd, g, h0, states, vnew, ht,
    cu_seqlens, chunk_offsets,
    HV,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Per (sequence, value head, V tile): the sequential pass over the sequence's chunks.

    Stores each chunk-entry state S [K, V] in states[chunk] and Delta = U - W S in vnew; then
    S <- e^gamma_C S + Kd^T Delta. h0 / ht: [N, HV, K, V] float32 initial / final states.
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    cols = V - iv * BV
    kv = K * V

    if HAS_H0:
        S = _load(h0 + (n * HV + hv) * kv + iv * BV, V, K, cols, BK, BV).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, num_chunks):
        _store(states + ((c0 + c) * HV + hv) * kv + iv * BV, V, K, cols, S, BK, BV)
        t0 = bos + c * BT
        rows = tl.minimum(eos - t0, BT).to(tl.int32)
        hk = (t0 * HV + hv) * K
        hvv = (t0 * HV + hv) * V + iv * BV
        Wc = _load(w + hk, HV * K, rows, K, BT, BK)
        KdT = _load_t(kd + hk, HV * K, rows, K, BT, BK)
        Uc = _load(u + hvv, HV * V, rows, cols, BT, BV).to(tl.float32)
        gam_last = tl.sum(_load_vec(g + t0 * HV + hv, HV, rows, BT), 0)
        delta = Uc - _mm(Wc, S, LOWP, PREC)
        _store(vnew + hvv, HV * V, rows, cols, delta, BT, BV)
        S = S * tl.exp(gam_last) + _mm(KdT, delta, LOWP, PREC)
    if STORE_HT:
        _store(ht + (n * HV + hv) * kv + iv * BV, V, K, cols, S, BK, BV)


@triton.jit
def _output_kernel(
    q, k, g, states, vnew, o,
    cu_seqlens, chunk_seq, chunk_local, chunk_offsets,
    scale, H, HV,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Per (chunk slot, value head): O = diag(e^gamma) Q S + (Q K^T * Gamma) Delta."""
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n = _chunk_bounds(slot, chunk_seq, chunk_local, cu_seqlens, BT)
    if seq < 0:
        return
    chunk = (tl.load(chunk_offsets + seq) + local).to(tl.int64)
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    ii = o_t[:, None]
    jj = o_t[None, :]
    qk_base = (t0 * H + h) * K

    qr, _ = _unit_rows(q + qk_base, H * K, n, K, BT, BK, NORM)
    qr = qr * scale
    kc = _unit_cols(k + qk_base, H * K, n, K, BT, BK, NORM)
    gam = tl.cumsum(_load_vec(g + t0 * HV + hv, HV, n, BT), 0)
    P = _mm(qr, kc, LOWP, PREC) * tl.exp(tl.where(ii >= jj, gam[:, None] - gam[None, :], float("-inf")))
    qe = qr * tl.exp(gam)[:, None]
    s_base = (chunk * HV + hv) * K * V
    hv_base = (t0 * HV + hv) * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        S = _load(states + s_base + iv * BV, V, K, cols, BK, BV)
        delta = _load(vnew + hv_base + iv * BV, HV * V, n, cols, BT, BV)
        out = _mm(qe, S, LOWP, PREC) + _mm(P, delta, LOWP, PREC)
        _store(o + hv_base + iv * BV, HV * V, n, cols, out, BT, BV)


@triton.jit
def _state_bwd_kernel(
    qd, kd, w, g, do, dvl, dht, dstates, dvnew, dh0,
    cu_seqlens, chunk_offsets,
    HV,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Per (sequence, value head, V tile): the reverse pass over chunks.

    With dS the gradient of the state leaving the chunk (stored in dstates[chunk]):
        dDelta = P^T dO + Kd dS      (P^T dO precomputed in dvl)
        dS    <- e^gamma_C dS + Qd^T dO - W^T dDelta
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    cols = V - iv * BV
    kv = K * V

    if HAS_DHT:
        dS = _load(dht + (n * HV + hv) * kv + iv * BV, V, K, cols, BK, BV).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for step in range(0, num_chunks):
        c = num_chunks - 1 - step
        _store(dstates + ((c0 + c) * HV + hv) * kv + iv * BV, V, K, cols, dS, BK, BV)
        t0 = bos + c * BT
        rows = tl.minimum(eos - t0, BT).to(tl.int32)
        hk = (t0 * HV + hv) * K
        hvv = (t0 * HV + hv) * V + iv * BV
        Kdc = _load(kd + hk, HV * K, rows, K, BT, BK)
        WT = _load_t(w + hk, HV * K, rows, K, BT, BK)
        QdT = _load_t(qd + hk, HV * K, rows, K, BT, BK)
        dox = _load(do + hvv, HV * V, rows, cols, BT, BV)
        local = _load(dvl + hvv, HV * V, rows, cols, BT, BV)
        gam_last = tl.sum(_load_vec(g + t0 * HV + hv, HV, rows, BT), 0)
        ddelta = local + _mm(Kdc, dS, LOWP, PREC)
        _store(dvnew + hvv, HV * V, rows, cols, ddelta, BT, BV)
        dS = dS * tl.exp(gam_last) + _mm(QdT, dox, LOWP, PREC) - _mm(WT, ddelta, LOWP, PREC)
    if STORE_DH0:
        _store(dh0 + (n * HV + hv) * kv + iv * BV, V, K, cols, dS, BK, BV)


@triton.jit
def _grad_kernel(
    q, k, v, g, beta, tmat, states, dstates, vnew, dvnew, do,
    dq, dk_part, dv, dbeta_part, dgam_part, dtmat,
    cu_seqlens, chunk_seq, chunk_local, chunk_offsets,
    scale, H, HV,
    K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):
    """Per (chunk slot, value head), everything but the UT-transform backward (`_ut_grad_kernel`):

    dq (final, per value head, float32) and dv; dk_hat, dbeta, dgamma so far and dT [BT, BT], which
    `_ut_grad_kernel` completes. Inputs: the chunk-entry state S, the gradient dS' of the state
    leaving the chunk, Delta and dDelta from the two sequential passes, T from `_prepare_kernel`.
    The equations are in hybridlm.ops.gated_delta_rule.chunk's module docstring.
    """
    slot = tl.program_id(0)
    hv = tl.program_id(1)
    seq, local, t0, n = _chunk_bounds(slot, chunk_seq, chunk_local, cu_seqlens, BT)
    if seq < 0:
        return
    chunk = (tl.load(chunk_offsets + seq) + local).to(tl.int64)
    h = hv // (HV // H)
    o_t = tl.arange(0, BT)
    ii = o_t[:, None]
    jj = o_t[None, :]

    gv = _load_vec(g + t0 * HV + hv, HV, n, BT)
    bv = _load_vec(beta + t0 * HV + hv, HV, n, BT)
    gam = tl.cumsum(gv, 0)
    gam_last = tl.sum(gv, 0)
    eg = tl.exp(gam)
    # T^T, loaded transposed: TT[a, b] = T[b, a].
    TT = _load_t(tmat + (t0 * HV + hv) * BT, HV * BT, n, BT, BT, BT)

    acc_dqs = tl.zeros([BT, BK], dtype=tl.float32)  # dO S^T
    acc_dkd = tl.zeros([BT, BK], dtype=tl.float32)  # Delta dS'^T
    acc_dw = tl.zeros([BT, BK], dtype=tl.float32)  # dDelta S^T  (dW = -acc_dw)
    acc_dp = tl.zeros([BT, BT], dtype=tl.float32)  # dO Delta^T
    acc_dpt = tl.zeros([BT, BT], dtype=tl.float32)  # Delta dO^T
    acc_dt = tl.zeros([BT, BT], dtype=tl.float32)  # dDelta (beta V)^T
    dbeta_acc = tl.zeros([BT], dtype=tl.float32)
    state_dot = tl.zeros([BK], dtype=tl.float32)  # <S, dS'> by rows of S
    s_base = (chunk * HV + hv) * K * V
    hv_base = (t0 * HV + hv) * V
    hv_stride = HV * V
    for iv in range(0, tl.cdiv(V, BV)):
        cols = V - iv * BV
        ST = _load_t(states + s_base + iv * BV, V, K, cols, BK, BV).to(tl.float32)
        dST = _load_t(dstates + s_base + iv * BV, V, K, cols, BK, BV).to(tl.float32)
        base = hv_base + iv * BV
        delta = _load(vnew + base, hv_stride, n, cols, BT, BV)
        deltaT = _load_t(vnew + base, hv_stride, n, cols, BT, BV)
        ddelta = _load(dvnew + base, hv_stride, n, cols, BT, BV)
        dox = _load(do + base, hv_stride, n, cols, BT, BV)
        doT = _load_t(do + base, hv_stride, n, cols, BT, BV)
        vx = _load(v + base, hv_stride, n, cols, BT, BV).to(tl.float32)
        vT = _load_t(v + base, hv_stride, n, cols, BT, BV).to(tl.float32)

        acc_dqs += _mm(dox, ST, LOWP, PREC)
        acc_dkd += _mm(delta, dST, LOWP, PREC)
        acc_dw += _mm(ddelta, ST, LOWP, PREC)
        acc_dp += _mm(dox, deltaT, LOWP, PREC)
        acc_dpt += _mm(delta, doT, LOWP, PREC)
        acc_dt += _mm(ddelta, vT * bv[None, :], LOWP, PREC)
        dvb = _dot(TT, ddelta, PREC)  # T^T dU
        _store(dv + base, hv_stride, n, cols, dvb * bv[:, None], BT, BV)
        dbeta_acc += tl.sum(dvb * vx, 1)
        state_dot += tl.sum(ST * dST, 0)

    # q and k are loaded only now, so that they do not hold registers through the V loop.
    qk_base = (t0 * H + h) * K
    qu, rq = _unit_rows(q + qk_base, H * K, n, K, BT, BK, NORM)
    qs = qu * scale
    ku, _ = _unit_rows(k + qk_base, H * K, n, K, BT, BK, NORM)
    kc = _unit_cols(k + qk_base, H * K, n, K, BT, BK, NORM)

    # Output term O = diag(e^gamma) Q S + (Q K^T * Gamma) Delta.
    decay_incl = tl.exp(tl.where(ii >= jj, gam[:, None] - gam[None, :], float("-inf")))
    dP = acc_dp * decay_incl
    dPT = acc_dpt * tl.exp(tl.where(jj >= ii, gam[None, :] - gam[:, None], float("-inf")))
    dqs = acc_dqs * eg[:, None] + _mm(dP, ku, LOWP, PREC)
    dku = _mm(dPT, qs, LOWP, PREC)
    dgam = eg * tl.sum(qs * acc_dqs, 1)
    E = dP * _mm(qs, kc, LOWP, PREC)
    dgam += tl.sum(E, 1) - tl.sum(E, 0)

    # State passed on: S' = e^gamma_C S + Kd^T Delta (gamma_C is gamma of the last row).
    to_end = tl.exp(gam_last - gam)
    dku += acc_dkd * to_end[:, None]
    dto_end = to_end * tl.sum(ku * acc_dkd, 1)
    dgam -= dto_end
    dgam_last = tl.sum(dto_end, 0) + tl.exp(gam_last) * tl.sum(state_dot, 0)
    # gamma_C is gamma at the last real row (padded rows have g = 0): its gradient goes there.
    dgam += tl.where(o_t == n - 1, dgam_last, 0.0)

    # W = T diag(beta e^gamma) K with dW = -dDelta S^T; dT collects the U and W terms.
    dW = -acc_dw
    bek = bv * eg
    dT = acc_dt + _dot(dW, kc * bek[None, :], PREC)
    dkb = _dot(TT, dW, PREC)
    dku += dkb * bek[:, None]
    kdkb = tl.sum(ku * dkb, 1)
    dbeta_acc += eg * kdkb
    dgam += bek * kdkb

    dqu = dqs * scale
    if NORM:  # back through the L2 norm: x_hat = x r, dx = r (dx_hat - x_hat (x_hat . dx_hat))
        dqu = (dqu - qu * tl.sum(qu * dqu, 1)[:, None]) * rq[:, None]
    hk_base = (t0 * HV + hv) * K
    _store(dq + hk_base, HV * K, n, K, dqu, BT, BK)
    _store(dk_part + hk_base, HV * K, n, K, dku, BT, BK)
    _store(dtmat + (t0 * HV + hv) * BT, HV * BT, n, BT, dT, BT, BT)
    tl.store(dgam_part + t0 * HV + hv + o_t * HV, dgam, mask=o_t < n)
    tl.store(dbeta_part + t0 * HV + hv + o_t * HV, dbeta_acc, mask=o_t < n)


@triton.jit
def _ut_grad_kernel(
    k, g, beta, tmat, dtmat, dk_part, dbeta_part, dgam_part, scratch,
    dk, dbeta, dg,
    cu_seqlens, chunk_seq, chunk_local,
    H, HV,
    K,
    BT: tl.constexpr, BK: tl.constexpr,
    NORM: tl.constexpr, PREC: tl.constexpr,
):
    """Per (chunk slot, value head): back through T = (I + A)^-1, A = diag(beta) (K K^T) * Gamma,
    then the within-chunk cumsum of g and the L2 norm of k. Completes dk, dbeta and dg.

    dA = -T^T dT T^T on the strict lower triangle; dM = dA * Gamma * beta (the gradient of K K^T)
    adds (dM + dM^T) K to dk_hat; dM^T goes through a per-program scratch tile (module docstring).
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
    TT = _load_t(tmat + t_base, HV * BT, n, BT, BT, BT)
    dT = _load(dtmat + t_base, HV * BT, n, BT, BT, BT)
    dA = -_dot(TT, _dot(dT, TT, PREC), PREC)

    qk_base = (t0 * H + h) * K
    ku, rk = _unit_rows(k + qk_base, H * K, n, K, BT, BK, NORM)
    kc = _unit_cols(k + qk_base, H * K, n, K, BT, BK, NORM)
    decay_strict = tl.exp(tl.where(ii > jj, gam[:, None] - gam[None, :], float("-inf")))
    kk = _dot(ku, kc, PREC)
    dM = dA * decay_strict * bv[:, None]
    EA = dM * kk  # = dA * A: the gradient of the exponents gamma_i - gamma_j
    dgam = _load_vec(dgam_part + t0 * HV + hv, HV, n, BT) + tl.sum(EA, 1) - tl.sum(EA, 0)
    dbeta_v = _load_vec(dbeta_part + t0 * HV + hv, HV, n, BT) + tl.sum(dA * decay_strict * kk, 1)
    tile = scratch + (slot.to(tl.int64) * HV + hv) * BT * BT
    tl.store(tile + ii * BT + jj, dM)
    tl.debug_barrier()
    dMT = tl.load(tile + jj * BT + ii)
    hk_base = (t0 * HV + hv) * K
    dku = _load(dk_part + hk_base, HV * K, n, K, BT, BK) + _dot(dM + dMT, ku, PREC)
    if NORM:
        dku = (dku - ku * tl.sum(ku * dku, 1)[:, None]) * rk[:, None]
    _store(dk + hk_base, HV * K, n, K, dku, BT, BK)
    # gamma is a within-chunk cumsum of g: dg_j = sum_{i >= j} dgamma_i.
    dgv = tl.sum(dgam, 0) - tl.cumsum(dgam, 0) + dgam
    tl.store(dbeta + t0 * HV + hv + o_t * HV, dbeta_v, mask=o_t < n)
    tl.store(dg + t0 * HV + hv + o_t * HV, dgv, mask=o_t < n)


@triton.jit
def _recurrent_kernel(
    q, k, v, g, beta, o, h0, ht,
    cu_seqlens,
    scale, H, HV,
    K, V,
    BK: tl.constexpr, BV: tl.constexpr,
    NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    """Token-by-token gated delta rule, one program per (sequence, value head, V tile).

    The state tile [K, BV] stays in float32 registers; h0 and ht may be the same tensor (the state
    is updated in place: each program reads its tile before writing it).
    """
    n = tl.program_id(0)
    hv = tl.program_id(1)
    iv = tl.program_id(2)
    h = hv // (HV // H)
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = iv * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = (n * HV + hv) * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_H0:
        S = tl.load(h0 + off_kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        qx = tl.load(q + (t * H + h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        kx = tl.load(k + (t * H + h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        if NORM:
            qx = qx * tl.rsqrt(tl.sum(qx * qx, 0) + 1e-6)
            kx = kx * tl.rsqrt(tl.sum(kx * kx, 0) + 1e-6)
        qx = qx * scale
        vx = tl.load(v + (t * HV + hv) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g + t * HV + hv).to(tl.float32))
        b = tl.load(beta + t * HV + hv).to(tl.float32)
        S = S * decay
        delta = b * (vx - tl.sum(kx[:, None] * S, 0))
        S = S + kx[:, None] * delta[None, :]
        out = tl.sum(qx[:, None] * S, 0)
        tl.store(o + (t * HV + hv) * V + o_v, out.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + off_kv, S, mask=m_kv)
