"""The gated delta rule in chunks of C = 64 tokens (WY representation / UT transform), plain PyTorch.

Forward, per value head and per chunk (positions i, j = 1..C), with Q the scaled L2-normalised
queries, K the normalised keys, V the values, beta and g the chunk's gates, S0 the state entering
the chunk and gamma_i = g_1 + ... + g_i the within-chunk cumulative log decay:

    Gamma  = [exp(gamma_i - gamma_j) if i >= j else 0]                       decay from j to i
    A      = strictly_lower(diag(beta) (K K^T) * Gamma)
    T      = (I + A)^-1                                                      the UT transform
    U      = T diag(beta) V,   W = T diag(beta e^gamma) K                     pseudo-values / keys
    Kd     = diag(e^(gamma_C - gamma)) K,  Qd = diag(e^gamma) Q               keys to the chunk end, queries
    M      = e^gamma_C I - Kd^T W                                            the chunk's state transition
    S_C    = M S0 + Kd^T U                                                   state passed on
    Delta  = U - W S0                                                        the chunk's delta-rule errors
    O      = Qd S0 + P Delta,   P = (Q K^T) * Gamma                          (P keeps the diagonal)

Everything except the state pass is batched over all chunks at once; the recurrence S0 -> S_C is a
loop over chunks with one batched product per step (M and Kd^T U are formed beforehand, Delta
afterwards). Ops are arranged for CPU speed, where memory traffic and the number of ops dominate:
in-place updates where a temporary would be dead anyway, fused multiply-adds (baddbmm, addcmul),
masks folded into the decay matrix, and diag(beta) K stacked on top of Q in one buffer so that
[A; P] is one product with K^T (and their gradients one product each in the backward).

Backward. Given dO and dS_C (from the next chunk, or from a loss on the final state), with
Qe = Qd - P W (formed in the forward: O = Qe S0 + P U) and Kbeta = diag(beta) K:

    dDelta = P^T dO + Kd dS_C                                          (= dU)
    dS0    = Qe^T dO + M^T dS_C                                        (carried to the previous chunk)

the second as a loop over chunks in reverse (one product per step), the first batched afterwards.
Then, batched over all chunks (S0 is the saved chunk-entry state):

    dQd = dO S0^T       dP = dO Delta^T       dKd = Delta dS_C^T       d(e^gamma_C) = <dS_C, S0>

UT transform: dU = dDelta and dW = -dDelta S0^T. With Vb = diag(beta) V and Kb = e^gamma Kbeta,
U = T Vb and W = T Kb give dVb = T^T dU and dKb = T^T dW = -dVb S0^T; d(M^-1) = -M^-1 dM M^-1 gives

    dA = strictly_lower(-(dVb U^T + dKb W^T)) = strictly_lower(-dVb Delta^T)     (U - W S0 = Delta)

and, as A = (Kbeta K^T) * Gamma,

    dKbeta = (dA * Gamma) K + e^gamma * dKb
    dQ     = e^gamma * dQd + (dP * Gamma) K
    dK     = (dP * Gamma)^T Q + (dA * Gamma)^T Kbeta + beta * dKbeta + e^(gamma_C - gamma) * dKd
    dV     = beta * dVb
    dbeta  = rowsum(dVb * V) + rowsum(dKbeta * K)

The log decays enter only through exponents, so the gate gradient collects the gradient of each
exponent (dX * X for X = exp(...)). With E = dA * A + dP * P for the pairwise exponents
gamma_i - gamma_j = g_(j+1) + ... + g_i:

    dg_l      = sum_(i >= l) dgamma_i  +  sum_(j < l) dto_end_j  +  sum_(i >= l > j) E_ij
    dgamma_i  = rowsum(dQd * Qd)_i + rowsum(dKb * Kb)_i  (+ e^gamma_C d(e^gamma_C) at i = C)
    dto_end_j = rowsum(dKd * Kd)_j                                     (to_end_j = gamma_C - gamma_j)

each accumulated as partial sums of the terms that contain g_l, never as a difference of two larger
sums. Finally q and k are normalised inside (x_hat = f x with f = scale (|x|^2 + 1e-6)^-1/2, scale = 1
for k), whose backward is dx = f (dx_hat - x_hat (x_hat . dx_hat) / scale^2).

Numerics. Every exponent is <= 0: the pairwise decays g_(j+1) + ... + g_i are formed by a masked
cumulative sum (only i > j contributes) and only then exponentiated, so no exp of a positive number,
no division by a decay, and no cancellation between large cumulative sums (g = -30 per step gives
gamma ~ -1900 inside a chunk; differences of such sums would lose the small decays). gamma, A, T and
the states are float32 (float64 for float64 inputs).

Chunk size. The chunk-by-chunk work (Gamma, A, T, P and their gradients) grows with C per token, the
state-passing work (M, Kd^T U, the loop) with 1/C. C = 64 is the operator's specification and the
default (CHUNK_SIZE); the code works for any C. On this project's 2-core CPU, C = 32 measured about
10-20% faster at K = 32, V = 64 and the same at K = 64, V = 128 (docs/benchmarks.md), and the UT
transform of fewer nearly parallel reflections is better conditioned in float32.

Packed documents and batches share one layout. Every document is cut into its own chunks (the last
one zero-padded; padding has k = v = 0, g = 0 and beta = 0, an exact no-op), and the chunks are
ordered by step: first the chunk 0 of every document, then chunk 1 of every document that has one,
and so on, documents sorted longest first. Step s of the state pass then touches a contiguous
slice of chunks and a contiguous prefix of the document states: one batched update per step, with
no Python loop over documents and no chunk straddling two documents.

Memory: the chunk-entry states (T/C states of [K, V] per head) are saved for the backward rather
than recomputed, which saves a second sequential pass, the slowest part of the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridlm.ops.gated_delta_rule.common import autocast_off, compute_dtype, document_bounds

CHUNK_SIZE = 64


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule with a hand-written backward. Arguments as `gated_delta_rule`.

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; initial_state: [N, HV, K, V].
    Returns (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 (float64 for float64
    inputs) or None).
    """
    out_dtype = q.dtype
    dtype = compute_dtype(q)
    batch, seq_len, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    # The grouped-value head repeat stays outside the Function: autograd's backward of the repeat
    # sums the gradients of the value heads sharing a q/k head.
    q, k = q.to(dtype), k.to(dtype)
    if value_heads != heads:
        q = q.repeat_interleave(value_heads // heads, dim=2)
        k = k.repeat_interleave(value_heads // heads, dim=2)
    num_tokens = batch * seq_len
    plan = _plan_chunks(cu_seqlens, batch, seq_len, CHUNK_SIZE, q.device)
    o, final_state = _ChunkGatedDeltaRule.apply(
        q.reshape(num_tokens, value_heads, key_dim),
        k.reshape(num_tokens, value_heads, key_dim),
        v.to(dtype).reshape(num_tokens, value_heads, value_dim),
        g.to(dtype).reshape(num_tokens, value_heads),
        beta.to(dtype).reshape(num_tokens, value_heads),
        None if initial_state is None else initial_state.to(dtype),
        plan,
        scale,
        use_qk_l2norm,
    )
    o = o.view(batch, seq_len, value_heads, value_dim).to(out_dtype)
    return o, (final_state if output_final_state else None)


@dataclass(frozen=True)
class _ChunkPlan:
    """Where tokens sit in the chunked layout and the order of the state pass (see module doc)."""

    chunk_size: int
    num_chunks: int
    doc_order: torch.Tensor  # [N]: documents sorted by chunk count, longest first (stable)
    doc_rank: torch.Tensor  # [N]: inverse permutation of doc_order
    steps: tuple[tuple[int, int], ...]  # per step: (first chunk, count); documents doc_order[:count]
    last_chunks: torch.Tensor  # last chunk of each document that has one, in plan order
    batch_shape: tuple[int, int] | None  # (B, T) for a plain batch: the layout is then a permute
    token_rows: torch.Tensor | None  # packed documents: row chunk * C + position of each token


def _plan_chunks(
    cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int, device: torch.device
) -> _ChunkPlan:
    if cu_seqlens is None:
        # B documents of T tokens: chunk s of row b is chunk s * B + b.
        num_steps = -(-seq_len // chunk_size)
        rows = torch.arange(batch, device=device)
        steps = tuple((step * batch, batch) for step in range(num_steps))
        last_chunks = rows + (num_steps - 1) * batch
        return _ChunkPlan(
            chunk_size, num_steps * batch, rows, rows, steps, last_chunks, (batch, seq_len), None
        )

    starts, lengths = document_bounds(cu_seqlens, batch, seq_len)
    num_docs = len(lengths)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    chunks_per_doc = (lengths_t + chunk_size - 1) // chunk_size
    _, doc_order = torch.sort(chunks_per_doc, descending=True, stable=True)
    doc_rank = torch.empty_like(doc_order)
    doc_rank[doc_order] = torch.arange(num_docs)
    most = int(chunks_per_doc.max())
    # active[s] = number of documents with more than s chunks; step s covers chunks offsets[s] ...
    at_most = torch.bincount(chunks_per_doc, minlength=most + 1).cumsum(0)
    active = num_docs - at_most[:most]
    offsets = active.cumsum(0) - active
    # Tokens are the documents back to back, in order.
    doc_of_token = torch.repeat_interleave(torch.arange(num_docs), lengths_t)
    position = torch.arange(len(doc_of_token)) - torch.tensor(starts, dtype=torch.long)[doc_of_token]
    chunk = offsets[position // chunk_size] + doc_rank[doc_of_token]
    chunks_sorted = chunks_per_doc[doc_order]
    with_chunks = chunks_sorted > 0
    last_chunks = offsets[chunks_sorted[with_chunks] - 1] + torch.arange(num_docs)[with_chunks]
    return _ChunkPlan(
        chunk_size=chunk_size,
        num_chunks=int(active.sum()),
        doc_order=doc_order.to(device),
        doc_rank=doc_rank.to(device),
        steps=tuple(zip(offsets.tolist(), active.tolist())),
        last_chunks=last_chunks.to(device),
        batch_shape=None,
        token_rows=(chunk * chunk_size + position % chunk_size).to(device),
    )


def _to_chunks(
    x: torch.Tensor, plan: _ChunkPlan, factor: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[num_tokens, HV, D] -> [num_chunks, HV, C, D], zeros in the padding.

    factor: optional [num_tokens, HV, 1] multiplier applied on the way (one pass instead of two).
    out: optional destination (a view into a larger buffer is fine); a fresh tensor otherwise.
    """
    size, (heads, dim) = plan.chunk_size, x.shape[1:]
    if plan.batch_shape is None:
        if factor is not None:
            x = x * factor
        chunked = x.new_zeros(plan.num_chunks * size, heads, dim)
        chunked.index_copy_(0, plan.token_rows, x)
        chunked = chunked.view(plan.num_chunks, size, heads, dim).transpose(1, 2)
        return chunked.contiguous() if out is None else out.copy_(chunked)
    if out is None:
        out = x.new_empty(plan.num_chunks, heads, size, dim)
    x = _as_steps(x, plan)
    if factor is None:
        _as_steps(out, plan, chunked=True).copy_(x)
    else:
        torch.mul(x, _as_steps(factor, plan), out=_as_steps(out, plan, chunked=True))
    return out


def _from_chunks(x: torch.Tensor, plan: _ChunkPlan, factor: torch.Tensor | None = None) -> torch.Tensor:
    """[num_chunks, HV, C, D] -> [num_tokens, HV, D] (inverse of `_to_chunks`), optionally times
    factor [num_tokens, HV, 1] on the way."""
    num_chunks, heads, size, dim = x.shape
    if plan.batch_shape is None:
        rows = x.transpose(1, 2).reshape(num_chunks * size, heads, dim).index_select(0, plan.token_rows)
        return rows if factor is None else rows.mul_(factor)
    batch, seq_len = plan.batch_shape
    out = x.new_empty(batch, num_chunks // batch * size, heads, dim)
    x = _as_steps(x, plan, chunked=True)
    if factor is None:
        _as_steps(out, plan).copy_(x)
    else:
        torch.mul(x, _as_steps(factor, plan), out=_as_steps(out, plan))
    return out[:, :seq_len].reshape(batch * seq_len, heads, dim)


def _as_steps(x: torch.Tensor, plan: _ChunkPlan, chunked: bool = False) -> torch.Tensor:
    """Plain batches only: a view [steps, B, HV, C, D] of a token-layout tensor ([B * T, HV, D],
    zero-padded to whole chunks when T is not a multiple of C, or already padded [B, steps * C, HV, D])
    or, with chunked=True, of a chunked-layout tensor [num_chunks, HV, C, D]."""
    size = plan.chunk_size
    batch = plan.batch_shape[0]
    num_steps = plan.num_chunks // batch
    if chunked:
        return x.unflatten(0, (num_steps, batch))
    x = x.reshape(batch, -1, *x.shape[-2:])
    if x.shape[1] != num_steps * size:
        x = F.pad(x, (0, 0, 0, 0, 0, num_steps * size - x.shape[1]))
    return x.view(batch, num_steps, size, *x.shape[-2:]).permute(1, 0, 3, 2, 4)


def _decays(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Within-chunk decays, g: [n, C] -> (e^gamma [n, C, 1], e^to_end [n, C, 1], decay_matrix [n, C, C]).

    gamma[i] = g_1 + ... + g_i; to_end[j] = g_(j+1) + ... + g_C = gamma_C - gamma_j;
    decay_matrix[i, j] = exp(g_(j+1) + ... + g_i) for i >= j, else 0 (its last row is e^to_end).
    """
    size = g.shape[-1]
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=g.device).tril(-1)
    # pair_sums[i, j] = g_(j+1) + ... + g_i for i > j and 0 for i <= j: each sum is accumulated
    # directly (masked, then cumsum over i), so small decays keep their precision next to large ones.
    pair_sums = (g.unsqueeze(-1) * strictly_lower).cumsum_(-2)
    # Entries with i <= j are exp(0) = 1 before masking: nothing can overflow.
    decay_matrix = pair_sums.exp_().tril_()
    return g.cumsum(-1).exp_().unsqueeze(-1), decay_matrix[:, -1, :].unsqueeze(-1), decay_matrix


def _pair_gate_grad(dpair: torch.Tensor) -> torch.Tensor:
    """Gate gradient from the pairwise exponents: dg_l = sum over i >= l > j of dpair[i, j].

    dpair: [n, C, C], the gradient of each exponent g_(j+1) + ... + g_i (zero above the diagonal;
    the diagonal is not a function of g and is never summed). Returns [n, C].
    Summed as partial sums, never as a difference of larger sums.
    """
    # row_prefix[i, m] = sum_(j <= m) dpair[i, j]; dg_l = sum_(i > l - 1) row_prefix[i, l - 1].
    row_prefix = dpair.cumsum_(-1).tril_(-1)  # in place: dpair is a temporary
    return F.pad(row_prefix.sum(-2)[..., :-1], (1, 0))


def _normalize_factor(x: torch.Tensor, scale: float, use_l2norm: bool) -> torch.Tensor:
    """factor = scale * (sum(x^2) + 1e-6)^-1/2 over the last dim ([..., 1]), or just scale."""
    if not use_l2norm:
        return x.new_full((*x.shape[:-1], 1), scale)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(1e-6).rsqrt_().mul_(scale)


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y, -1) for [..., D] tensors, as a batch of 1 x D by D x 1 products (one pass, no
    temporary the size of x; non-contiguous inputs are copied first)."""
    dim = x.shape[-1]
    return torch.bmm(x.reshape(-1, 1, dim), y.reshape(-1, dim, 1)).view(x.shape[:-1])


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over the last dim: out[i] = x[i] + x[i+1] + ..."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """T = (I + strictly_lower(a))^-1 for a batch [n, C, C]: a's diagonal and upper part are ignored.

    One LAPACK triangular solve per matrix (single-threaded). Blocked inverses built from batched
    products (invert small diagonal blocks, merge with T21 = -T22 A21 T11) were measured slower on
    CPU at C = 32 and 64: see docs/benchmarks.md.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Inputs in token layout (head-repeated, in the compute dtype): q, k [num_tokens, HV, K],
    v [num_tokens, HV, V], g, beta [num_tokens, HV], initial_state [N, HV, K, V] or None.
    Outputs o [num_tokens, HV, V] and the final state. Inside, every chunked tensor is
    [n, C, .] with n = num_chunks * HV (chunk-major, then head), and per-position vectors are
    [n, C]. From here on q means scale * l2norm(q) and k means l2norm(k).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, plan, scale, use_qk_l2norm):
        with autocast_off(q.device):
            return _ChunkGatedDeltaRule._forward(
                ctx, q, k, v, g, beta, initial_state, plan, scale, use_qk_l2norm
            )

    @staticmethod
    def backward(ctx, grad_o, grad_final_state):
        with autocast_off(ctx.plan.doc_order.device):
            return _ChunkGatedDeltaRule._backward(ctx, grad_o, grad_final_state)

    @staticmethod
    def _forward(ctx, q_tokens, k_tokens, v_tokens, g, beta_tokens, initial_state, plan, scale, use_qk_l2norm):
        heads, key_dim = q_tokens.shape[1:]
        value_dim = v_tokens.shape[-1]
        size = plan.chunk_size
        num_docs = len(plan.doc_order)
        # Normalisation factors in token layout, applied while reordering into chunks.
        q_factor = _normalize_factor(q_tokens, scale, use_qk_l2norm)
        k_factor = _normalize_factor(k_tokens, 1.0, use_qk_l2norm)
        k = _to_chunks(k_tokens, plan, k_factor).flatten(0, 1)
        rows = k.shape[0]
        # [diag(beta) K; Q] in one buffer: a single product with K^T gives [A; P] (before the decays).
        kq = k.new_empty(rows, 2 * size, key_dim)
        k_beta, q = kq[:, :size], kq[:, size:]
        _to_chunks(q_tokens, plan, q_factor, out=q.view(-1, heads, size, key_dim))
        v_beta = _to_chunks(v_tokens, plan, beta_tokens.unsqueeze(-1)).flatten(0, 1)
        g = _to_chunks(g.unsqueeze(-1), plan).view(rows, size)
        beta = _to_chunks(beta_tokens.unsqueeze(-1), plan).view(rows, size, 1)
        torch.mul(k, beta, out=k_beta)
        if initial_state is None:
            initial_state = k.new_zeros(num_docs * heads, key_dim, value_dim)
        else:
            initial_state = initial_state[plan.doc_order].flatten(0, 1)

        exp_gamma, exp_to_end, decay_matrix = _decays(g)
        ap = torch.bmm(kq, k.mT)
        ap.view(rows, 2, size, size).mul_(decay_matrix.unsqueeze(1))
        a, p = ap[:, :size], ap[:, size:]  # `a` keeps A's diagonal: the solve ignores it
        t = _unit_lower_inverse(a)
        u = torch.bmm(t, v_beta)
        del v_beta
        w = torch.bmm(t, k_beta * exp_gamma)
        k_to_end = k * exp_to_end  # Kd
        transition = torch.bmm(k_to_end.mT, w).neg_()  # M = e^gamma_C I - Kd^T W
        transition.diagonal(dim1=-2, dim2=-1).add_(exp_gamma[:, -1])
        states, final_state = _state_pass(transition, torch.bmm(k_to_end.mT, u), initial_state, plan.steps, heads)
        delta = u.baddbmm_(w, states, alpha=-1.0)  # Delta = U - W S0, in U's memory
        q_decayed = q * exp_gamma  # Qd
        o = torch.bmm(q_decayed, states).baddbmm_(p, delta)
        q_entry = q_decayed.baddbmm_(p, w, alpha=-1.0)  # Qe = Qd - P W, in Qd's memory

        ctx.plan, ctx.scale, ctx.use_qk_l2norm = plan, scale, use_qk_l2norm
        ctx.save_for_backward(
            q_factor, k_factor, beta_tokens, v_tokens, kq, k, beta, decay_matrix, exp_gamma, exp_to_end,
            k_to_end, q_entry, ap, t, transition, states, delta,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        o = _from_chunks(o.view(-1, heads, size, value_dim), plan)
        return o, final_state.view(num_docs, heads, key_dim, value_dim)[plan.doc_rank]

    @staticmethod
    def _backward(ctx, grad_o, grad_final_state):
        plan = ctx.plan
        (
            q_factor, k_factor, beta_tokens, v_tokens, kq, k, beta, decay_matrix, exp_gamma, exp_to_end,
            k_to_end, q_entry, ap, t, transition, states, delta,
        ) = ctx.saved_tensors  # fmt: skip
        heads = q_factor.shape[1]
        size = plan.chunk_size
        rows, _, value_dim = delta.shape
        num_docs = len(plan.doc_order)
        k_beta, q = kq[:, :size], kq[:, size:]
        a, p = ap[:, :size], ap[:, size:]
        if grad_o is None:
            do = torch.zeros_like(delta)
        else:
            do = _to_chunks(grad_o.to(delta.dtype), plan).flatten(0, 1)
        if grad_final_state is None:
            dfinal_state = states.new_zeros(num_docs * heads, *states.shape[1:])
        else:
            dfinal_state = grad_final_state.to(delta.dtype)[plan.doc_order].flatten(0, 1)

        # Reverse state pass: dS_C of every chunk, then dDelta = P^T dO + Kd dS_C.
        dstates_out, dinitial_state = _reverse_state_pass(
            transition, torch.bmm(q_entry.mT, do), dfinal_state, plan, heads
        )
        ddelta = torch.bmm(p.mT, do).baddbmm_(k_to_end, dstates_out)

        # O = Qd S0 + P Delta and S_C = e^gamma_C S0 + Kd^T Delta.
        dq_decayed = torch.bmm(do, states.mT)
        dp = torch.bmm(do, delta.mT)
        del do
        dk_to_end = torch.bmm(delta, dstates_out.mT)
        # UT transform: dU = dDelta and dW = -dDelta S0^T give dVb = T^T dDelta, dKb = -dVb S0^T
        # and dA = -(dVb U^T + dKb W^T) = -dVb (U - W S0)^T = -dVb Delta^T. The W side comes out
        # negated; it is kept negated (neg_*) and the sign is flipped where it is used.
        dv_beta = torch.bmm(t.mT, ddelta)
        del ddelta
        neg_dkb = torch.bmm(dv_beta, states.mT)
        neg_da = torch.bmm(dv_beta, delta.mT).tril_(-1)

        # Exponent gradients of the pairwise decays (dX * X for X = A, P), before dA and dP are
        # turned in place into gradients w.r.t. K_beta K^T and Q K^T (times Gamma).
        dpair = (dp * p).addcmul_(neg_da, a, value=-1.0)
        neg_da.mul_(decay_matrix)
        dp.mul_(decay_matrix)

        # A = (diag(beta) K) K^T * Gamma and Kb = e^gamma (diag(beta) K): gradient w.r.t. diag(beta) K.
        neg_dk_beta = torch.bmm(neg_da, k).addcmul_(neg_dkb, exp_gamma)
        dq = torch.bmm(dp, k).addcmul_(dq_decayed, exp_gamma)
        dk = torch.bmm(dp.mT, q).baddbmm_(neg_da.mT, k_beta, alpha=-1.0)
        del dp, neg_da
        dk.addcmul_(neg_dk_beta, beta, value=-1.0).addcmul_(dk_to_end, exp_to_end)

        # dV = beta dVb and the V part of dbeta, in token layout (the values are not kept in chunks).
        dv = _from_chunks(dv_beta.view(-1, heads, size, value_dim), plan)
        del dv_beta
        dbeta_values = _row_dot(dv, v_tokens)
        dv.mul_(beta_tokens.unsqueeze(-1))
        dbeta = _row_dot(neg_dk_beta, k).neg_()
        # gamma_i enters through Qd = e^gamma Q and Kb = e^gamma diag(beta) K, gamma_C also through
        # e^gamma_C S0, and to_end_j through Kd.
        dgamma = (_row_dot(dq_decayed, q) - _row_dot(neg_dkb, k_beta)).mul_(exp_gamma.squeeze(-1))
        dgamma[:, -1] += exp_gamma[:, -1, 0] * _row_dot(dstates_out, states).sum(-1)
        dto_end = _row_dot(dk_to_end, k_to_end)
        dg = _suffix_sum(dgamma) + F.pad(dto_end[:, :-1], (1, 0)).cumsum(-1) + _pair_gate_grad(dpair)

        # Normalisation backward (module doc); the factors are applied while leaving the chunks.
        if ctx.use_qk_l2norm:
            dq.addcmul_(q, _row_dot(q, dq).unsqueeze(-1), value=-1.0 / ctx.scale**2)
            dk.addcmul_(k, _row_dot(k, dk).unsqueeze(-1), value=-1.0)
        dinitial = None
        if ctx.needs_input_grad[5]:
            dinitial = dinitial_state.view(num_docs, heads, *states.shape[1:])[plan.doc_rank]

        def to_tokens(x: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
            return _from_chunks(x.view(-1, heads, size, x.shape[-1]), plan, factor)

        return (
            to_tokens(dq, q_factor),
            to_tokens(dk, k_factor),
            dv,
            to_tokens(dg.unsqueeze(-1)).squeeze(-1),
            to_tokens(dbeta.unsqueeze(-1)).squeeze(-1).add_(dbeta_values),
            dinitial,
            None,
            None,
            None,
        )


def _state_pass(transition, incoming, initial_state, steps, heads):
    """The sequential part of the forward: S_C = M S0 + Kd^T U, chunk after chunk.

    transition (M): [n, K, K]; incoming (Kd^T U): [n, K, V]; initial_state: [N * HV, K, V] in plan
    order; steps: (first chunk, count) per step. Step s reads the entry states of its chunks and
    writes the states they pass on straight into the entry slots of the same documents' next chunks
    (the next step's slice begins with them) or, for documents that end, into the final states.
    Returns (entry states [n, K, V], final states [N * HV, K, V] in plan order).
    """
    num_rows = transition.shape[0]
    states = torch.empty_like(incoming)
    final_state = initial_state.clone()  # documents without tokens keep their initial state
    if steps:
        count = steps[0][1] * heads
        states[:count] = initial_state[:count]
    for step, (first, count) in enumerate(steps):
        first, count = first * heads, count * heads
        next_first, next_count = (
            (steps[step + 1][0] * heads, steps[step + 1][1] * heads) if step + 1 < len(steps) else (num_rows, 0)
        )
        # Continuing documents first, then those that end here.
        for lo, hi, out in (
            (0, next_count, states[next_first : next_first + next_count]),
            (next_count, count, final_state[next_count:count]),
        ):
            if hi > lo:
                part = slice(first + lo, first + hi)
                torch.baddbmm(incoming[part], transition[part], states[part], out=out)
    return states, final_state


def _reverse_state_pass(transition, from_o, dfinal_state, plan, heads):
    """The sequential part of the backward, mirror of `_state_pass`: dS0 = M^T dS_C + Qe^T dO.

    from_o (Qe^T dO): [n, K, V]; dfinal_state: [N * HV, K, V] gradients of the final states in plan
    order. Step s reads dS_C of its chunks and writes their dS0 into the dS_C slots of the same
    documents' previous chunks (or the initial-state gradients).
    Returns (dS_C of every chunk [n, K, V], gradients of the initial states [N * HV, K, V]).
    """
    dstates_out = torch.empty_like(from_o)
    last_rows = (plan.last_chunks[:, None] * heads + torch.arange(heads, device=from_o.device)).flatten()
    dstates_out[last_rows] = dfinal_state[: len(last_rows)]
    dinitial_state = dfinal_state.clone()  # documents without tokens pass it straight through
    steps = plan.steps
    for step in reversed(range(len(steps))):
        first, count = steps[step][0] * heads, steps[step][1] * heads
        if step > 0:
            previous_first = steps[step - 1][0] * heads
            out = dstates_out[previous_first : previous_first + count]
        else:
            out = dinitial_state[:count]
        chunks = slice(first, first + count)
        torch.baddbmm(from_o[chunks], transition[chunks].mT, dstates_out[chunks], out=out)
    return dstates_out, dinitial_state
