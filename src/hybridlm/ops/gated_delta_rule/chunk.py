"""The gated delta rule in chunks of C = 64 tokens (WY representation / UT transform), plain PyTorch.

Forward, per value head and per chunk (positions i, j = 1..C), with Q the scaled L2-normalised
queries, K the normalised keys, V the values, beta and g the chunk's gates, S0 the state entering
the chunk and gamma_i = g_1 + ... + g_i the within-chunk cumulative log decay:

    Gamma  = [exp(gamma_i - gamma_j) if i >= j else 0]                       decay from j to i
    A      = strictly_lower(diag(beta) (K K^T) * Gamma)
    T      = (I + A)^-1                                                      the UT transform
    U      = T diag(beta) V,   W = T diag(beta e^gamma) K                     pseudo-values / keys
    Delta  = U - W S0                                                        the chunk's delta-rule errors
    O      = diag(e^gamma) Q S0 + P Delta,   P = (Q K^T) * Gamma             (P keeps the diagonal)
    S_C    = e^gamma_C S0 + (diag(e^(gamma_C - gamma)) K)^T Delta            state passed on

Everything except the state pass is batched over all chunks at once; only the recurrence
S0 -> S_C runs as a loop over chunks (two matmuls per step). Ops are arranged for CPU speed:
in-place updates where a temporary would be dead anyway (fresh large tensors are expensive),
fused multiply-adds (baddbmm, addcmul), and masks folded into the decay matrix.

Backward. Given dO and dS_C (from the next chunk, or from a loss on the final state), write
Qd = diag(e^gamma) Q, Kd = diag(e^(gamma_C - gamma)) K and Kbeta = diag(beta) K. Reverse over chunks:

    dDelta = P^T dO + Kd dS_C
    dS0    = Qd^T dO + e^gamma_C dS_C - W^T dDelta                     (carried to the previous chunk)

then, batched over all chunks (S0 is the saved chunk-entry state):

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

Packed documents and batches share one layout. Every document is cut into its own chunks (the last
one zero-padded; padding has k = v = 0, g = 0 and beta = 0, an exact no-op), and the chunks are
ordered by step: first the chunk 0 of every document, then chunk 1 of every document that has one,
and so on, documents sorted longest first. Step s of the state pass then touches a contiguous
slice of chunks and a contiguous prefix of the document states: one batched update per step, with
no Python loop over documents and no chunk straddling two documents.

Memory: the chunk-entry states (T/C states of [K, V] per head) are saved for the backward rather
than recomputed. On CPU that memory is small next to the activations (K*V/C floats per token and
head, e.g. 128 for K=64, V=128) and saves a second sequential pass, the slowest part of the backward.
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


def _to_chunks(x: torch.Tensor, plan: _ChunkPlan, factor: torch.Tensor | None = None) -> torch.Tensor:
    """[num_tokens, HV, D] -> [num_chunks, HV, C, D], zeros in the padding; always a fresh tensor.

    factor: optional [num_tokens, HV, 1] multiplier applied on the way (one pass instead of two).
    """
    size, (heads, dim) = plan.chunk_size, x.shape[1:]
    if plan.batch_shape is None:
        if factor is not None:
            x = x * factor
        chunked = x.new_zeros(plan.num_chunks * size, heads, dim)
        chunked.index_copy_(0, plan.token_rows, x)
        return chunked.view(plan.num_chunks, size, heads, dim).transpose(1, 2).contiguous()
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
    """Within-chunk log decays, g: [n, HV, C] -> (gamma, to_end, decay_matrix).

    gamma[i] = g_1 + ... + g_i; to_end[j] = g_(j+1) + ... + g_C = gamma_C - gamma_j;
    decay_matrix[i, j] = exp(g_(j+1) + ... + g_i) for i >= j, else 0: [n, HV, C, C].
    """
    size = g.shape[-1]
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=g.device).tril(-1)
    # pair_sums[i, j] = g_(j+1) + ... + g_i for i > j and 0 for i <= j: each sum is accumulated
    # directly (masked, then cumsum over i), so small decays keep their precision next to large ones.
    pair_sums = (g.unsqueeze(-1) * strictly_lower).cumsum_(-2)
    to_end = pair_sums[..., -1, :].clone()
    # Entries with i <= j are exp(0) = 1 before masking: nothing can overflow.
    decay_matrix = pair_sums.exp_().tril_()
    return g.cumsum(-1), to_end, decay_matrix


def _pair_gate_grad(dpair: torch.Tensor) -> torch.Tensor:
    """Gate gradient from the pairwise exponents: dg_l = sum over i >= l > j of dpair[i, j].

    dpair: [n, HV, C, C], the gradient of each exponent g_(j+1) + ... + g_i (zero above the
    diagonal; the diagonal is not a function of g and is never summed). Returns [n, HV, C].
    Summed as partial sums, never as a difference of larger sums.
    """
    # row_prefix[i, m] = sum_(j <= m) dpair[i, j]; dg_l = sum_(i > l - 1) row_prefix[i, l - 1].
    row_prefix = dpair.cumsum_(-1).tril_(-1)  # in place: dpair is a temporary
    return torch.nn.functional.pad(row_prefix.sum(-2)[..., :-1], (1, 0))


def _normalize_factor(x: torch.Tensor, scale: float, use_l2norm: bool) -> torch.Tensor:
    """factor = scale * (sum(x^2) + 1e-6)^-1/2 over the last dim ([..., 1]), or just scale."""
    if not use_l2norm:
        return x.new_full((*x.shape[:-1], 1), scale)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(1e-6).rsqrt_().mul_(scale)


def _normalize_backward_(dx_hat: torch.Tensor, x_hat: torch.Tensor, scale: float, use_l2norm: bool):
    """For x_hat = factor * x (see `_normalize_factor`), dx = factor * (dx_hat - x_hat (x_hat . dx_hat)
    / scale^2). Computes the bracket in dx_hat's memory; the caller applies factor."""
    if use_l2norm:
        dot = (x_hat * dx_hat).sum(-1, keepdim=True)
        dx_hat.addcmul_(x_hat, dot, value=-1.0 / scale**2)
    return dx_hat


def _suffix_sum(x: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over the last dim: out[i] = x[i] + x[i+1] + ..."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product over the last two dims of [n, HV, ., .] tensors (transposed views welcome)."""
    return torch.matmul(a, b)


def _add_bmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b in place, for contiguous [n, HV, ., .] out (no temporary product)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=alpha)
    return out


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Inputs in token layout (head-repeated, in the compute dtype): q, k [num_tokens, HV, K],
    v [num_tokens, HV, V], g, beta [num_tokens, HV], initial_state [N, HV, K, V] or None.
    Outputs o [num_tokens, HV, V] and the final state. In the chunked layout every tensor is
    [n, HV, C, .] with n = num_chunks. From here on q means scale * l2norm(q) and k means l2norm(k).
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
    def _forward(ctx, q, k, v, g, beta, initial_state, plan, scale, use_qk_l2norm):
        # Normalisation factors in token layout, applied while reordering into chunks.
        q_factor = _normalize_factor(q, scale, use_qk_l2norm)
        k_factor = _normalize_factor(k, 1.0, use_qk_l2norm)
        q, k = _to_chunks(q, plan, q_factor), _to_chunks(k, plan, k_factor)
        v = _to_chunks(v, plan)
        beta_tokens = beta
        g = _to_chunks(g.unsqueeze(-1), plan).squeeze(-1)
        beta = _to_chunks(beta.unsqueeze(-1), plan).squeeze(-1)
        if initial_state is None:
            initial_state = q.new_zeros(len(plan.doc_order), q.shape[1], q.shape[-1], v.shape[-1])
        else:
            initial_state = initial_state[plan.doc_order]

        gamma, to_end, decay_matrix = _decays(g)
        exp_gamma, exp_to_end = gamma.exp(), to_end.exp()
        k_beta = k * beta.unsqueeze(-1)
        # UT transform for all chunks at once. `a` keeps A's diagonal: the unitriangular solve
        # ignores it, and the backward masks it.
        a = _bmm(k_beta, k.mT).mul_(decay_matrix)
        eye = torch.eye(plan.chunk_size, dtype=q.dtype, device=q.device).expand_as(a)
        t = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        u = _bmm(t, v * beta.unsqueeze(-1))
        w = _bmm(t, k_beta * exp_gamma.unsqueeze(-1))

        k_to_end = k * exp_to_end.unsqueeze(-1)  # Kd: keys decayed to the chunk end
        states, delta, final_state = _state_pass(
            u, w, k_to_end, exp_gamma[..., -1], initial_state, plan.steps
        )
        q_decayed = q * exp_gamma.unsqueeze(-1)  # Qd: queries seeing the decayed entry state
        p = _bmm(q, k.mT).mul_(decay_matrix)
        o = _add_bmm_(_bmm(q_decayed, states), p, delta)

        ctx.plan, ctx.scale, ctx.use_qk_l2norm = plan, scale, use_qk_l2norm
        ctx.save_for_backward(
            q_factor, k_factor, beta_tokens, q, k, v, beta, k_beta, decay_matrix, exp_gamma, exp_to_end,
            q_decayed, k_to_end, a, t, w, states, delta, p,
        )  # fmt: skip
        ctx.set_materialize_grads(False)
        return _from_chunks(o, plan), final_state[plan.doc_rank]

    @staticmethod
    def _backward(ctx, grad_o, grad_final_state):
        plan = ctx.plan
        (
            q_factor, k_factor, beta_tokens, q, k, v, beta, k_beta, decay_matrix, exp_gamma, exp_to_end,
            q_decayed, k_to_end, a, t, w, states, delta, p,
        ) = ctx.saved_tensors  # fmt: skip
        if grad_o is None:
            do = torch.zeros_like(delta)
        else:
            do = _to_chunks(grad_o.to(q.dtype), plan)
        if grad_final_state is None:
            dfinal_state = states.new_zeros(len(plan.doc_order), *states.shape[1:])
        else:
            dfinal_state = grad_final_state.to(q.dtype)[plan.doc_order]

        # Reverse state pass: dDelta = P^T dO + Kd dS_C, and dS_C of every chunk.
        ddelta = _bmm(p.mT, do)
        dstates_out, dinitial_state = _reverse_state_pass(
            ddelta, _bmm(q_decayed.mT, do), w, k_to_end, exp_gamma[..., -1], dfinal_state, plan
        )

        # O = Qd S0 + P Delta and S_C = e^gamma_C S0 + Kd^T Delta.
        dq_decayed = _bmm(do, states.mT)
        dp = _bmm(do, delta.mT)
        dk_to_end = _bmm(delta, dstates_out.mT)
        # UT transform: dU = dDelta and dW = -dDelta S0^T give dVb = T^T dDelta, dKb = -dVb S0^T
        # and dA = -(dVb U^T + dKb W^T) = -dVb (U - W S0)^T = -dVb Delta^T. The W side comes out
        # negated; it is kept negated (neg_*) and the sign is flipped where it is used.
        dv_beta = _bmm(t.mT, ddelta)
        neg_dkb = _bmm(dv_beta, states.mT)
        neg_da = _bmm(dv_beta, delta.mT).tril_(-1)

        # Exponent gradients of the pairwise decays (dX * X for X = A, P), before dA and dP are
        # turned in place into gradients w.r.t. K_beta K^T and Q K^T (times Gamma).
        dpair = (dp * p).addcmul_(neg_da, a, value=-1.0)
        neg_da.mul_(decay_matrix)
        dp.mul_(decay_matrix)

        # A = (diag(beta) K) K^T * Gamma and Kb = e^gamma (diag(beta) K): gradient w.r.t. diag(beta) K.
        neg_dk_beta = _bmm(neg_da, k).addcmul_(neg_dkb, exp_gamma.unsqueeze(-1))
        dq = _bmm(dp, k).addcmul_(dq_decayed, exp_gamma.unsqueeze(-1))
        dk = _add_bmm_(_bmm(dp.mT, q), neg_da.mT, k_beta, alpha=-1.0)
        dk.addcmul_(neg_dk_beta, beta.unsqueeze(-1), value=-1.0).addcmul_(dk_to_end, exp_to_end.unsqueeze(-1))

        # Row sums of products for beta and the gate exponents. Each product overwrites a gradient
        # that is no longer needed: fresh large tensors cost page faults on CPU.
        dv = _from_chunks(dv_beta, plan, beta_tokens.unsqueeze(-1))  # dV = beta dVb, in token layout
        dbeta = dv_beta.mul_(v).sum(-1) - neg_dk_beta.mul_(k).sum(-1)
        dgamma = dq_decayed.mul_(q_decayed).sum(-1) - exp_gamma * neg_dkb.mul_(k_beta).sum(-1)
        dgamma[..., -1] += exp_gamma[..., -1] * dstates_out.mul_(states).sum((-2, -1))  # d e^gamma_C
        dto_end = dk_to_end.mul_(k_to_end).sum(-1)
        dg = _suffix_sum(dgamma) + F.pad(dto_end[..., :-1], (1, 0)).cumsum(-1) + _pair_gate_grad(dpair)

        dq = _normalize_backward_(dq, q, ctx.scale, ctx.use_qk_l2norm)
        dk = _normalize_backward_(dk, k, 1.0, ctx.use_qk_l2norm)
        dinitial = dinitial_state[plan.doc_rank] if ctx.needs_input_grad[5] else None
        return (
            _from_chunks(dq, plan, q_factor),
            _from_chunks(dk, plan, k_factor),
            dv,
            _from_chunks(dg.unsqueeze(-1), plan).squeeze(-1),
            _from_chunks(dbeta.unsqueeze(-1), plan).squeeze(-1),
            dinitial,
            None,
            None,
            None,
        )


def _state_pass(u, w, k_to_end, chunk_decay, initial_state, steps):
    """The sequential part of the forward: the state entering every chunk, and Delta.

    u, w, k_to_end: [n, HV, C, V|K|K]; chunk_decay: [n, HV] (e^gamma_C); initial_state: [N, HV, K, V]
    in plan order. Step s reads the states of its chunks and writes the states they pass on
    straight into the entry slots of the same documents' next chunks (the next step's slice
    begins with them) or, for documents that end, into the final states: no copies.
    Returns (states [n, HV, K, V], delta [n, HV, C, V], final states [N, HV, K, V] in plan order).
    """
    num_chunks, heads, size, value_dim = u.shape
    key_dim = w.shape[-1]
    states = u.new_empty(num_chunks, heads, key_dim, value_dim)
    delta = torch.empty_like(u)
    final_state = initial_state.clone()  # documents without tokens keep their initial state
    if steps:
        first, count = steps[0]
        states[:count] = initial_state[:count]
    for step, (first, count) in enumerate(steps):
        chunks = slice(first, first + count)
        # Delta = U - W S0, as one fused batched matmul.
        torch.baddbmm(
            u[chunks].flatten(0, 1),
            w[chunks].flatten(0, 1),
            states[chunks].flatten(0, 1),
            alpha=-1,
            out=delta[chunks].flatten(0, 1),
        )
        next_first, next_count = steps[step + 1] if step + 1 < len(steps) else (num_chunks, 0)
        # S_C = e^gamma_C S0 + Kd^T Delta: continuing documents first, then those that end here.
        for lo, hi, out in (
            (0, next_count, states[next_first : next_first + next_count]),
            (next_count, count, final_state[next_count:count]),
        ):
            if hi > lo:
                part = slice(first + lo, first + hi)
                torch.mul(states[part], chunk_decay[part, :, None, None], out=out)
                out.flatten(0, 1).baddbmm_(k_to_end[part].flatten(0, 1).mT, delta[part].flatten(0, 1))
    return states, delta, final_state


def _reverse_state_pass(ddelta, dstate_from_o, w, k_to_end, chunk_decay, dfinal_state, plan):
    """The sequential part of the backward, mirror of `_state_pass`.

    ddelta: [n, HV, C, V] holding P^T dO, completed in place with Kd dS_C. dstate_from_o: Qd^T dO,
    [n, HV, K, V]. dfinal_state: [N, HV, K, V] gradients of the final states in plan order.
    Step s reads dS_C of its chunks and writes dS0 = e^gamma_C dS_C + Qd^T dO - W^T dDelta into the
    dS_C slots of the same documents' previous chunks (or the initial-state gradients).
    Returns (dS_C of every chunk [n, HV, K, V], gradients of the initial states [N, HV, K, V]).
    """
    dstates_out = torch.empty_like(dstate_from_o)
    with_chunks = len(plan.last_chunks)
    dstates_out[plan.last_chunks] = dfinal_state[:with_chunks]
    dinitial_state = dfinal_state.clone()  # documents without tokens pass it straight through
    for step in reversed(range(len(plan.steps))):
        first, count = plan.steps[step]
        chunks = slice(first, first + count)
        dstate_out = dstates_out[chunks].flatten(0, 1)
        chunk_ddelta = ddelta[chunks].flatten(0, 1)
        chunk_ddelta.baddbmm_(k_to_end[chunks].flatten(0, 1), dstate_out)
        if step > 0:
            previous_first = plan.steps[step - 1][0]
            out = dstates_out[previous_first : previous_first + count]
        else:
            out = dinitial_state[:count]
        torch.addcmul(dstate_from_o[chunks], dstates_out[chunks], chunk_decay[chunks, :, None, None], out=out)
        out.flatten(0, 1).baddbmm_(w[chunks].flatten(0, 1).mT, chunk_ddelta, alpha=-1)
    return dstates_out, dinitial_state
