"""Triton kernel of the token-by-token gated delta rule (decoding and short prompts).

The chunked kernels (training, prefill) are in `kernels_split.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
