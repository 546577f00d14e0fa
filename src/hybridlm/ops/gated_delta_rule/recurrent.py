"""The gated delta rule one token at a time: the decoding path.

Per value head, with the state S: [K, V] and alpha_t = exp(g_t):

    S~_t  = alpha_t S_{t-1}                       decay first
    delta = beta_t (v_t - S~_t^T k_t)             delta-rule error against the decayed state
    S_t   = S~_t + k_t delta^T
    o_t   = S_t^T q_t                             q already L2-normalised and scaled

Batched over sequences and heads; grouped values (HV = G * H) are handled by viewing the state
as [N, H, G, K, V] so that q/k heads broadcast over their G value heads without being copied.
Differentiable through plain autograd (fine for short sequences; long ones want `chunk`).
"""

from __future__ import annotations

import torch

from hybridlm.ops.gated_delta_rule.common import autocast_off, compute_dtype, document_bounds, normalize_qk


def recurrent_gated_delta_rule(
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
    """Step-by-step gated delta rule. Arguments as `gated_delta_rule` (already validated).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; initial_state: [N, HV, K, V].
    Returns (o [B, T, HV, V] in q's dtype, final state [N, HV, K, V] float32 (float64 for
    float64 inputs) or None).
    """
    with autocast_off(q.device):
        return _recurrent(
            q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm
        )


def _recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    out_dtype = q.dtype
    dtype = compute_dtype(q)
    batch, seq_len, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    group = value_heads // heads
    q, k = normalize_qk(q, k, scale, use_qk_l2norm, dtype)
    v, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)

    if cu_seqlens is not None:
        # Documents become the rows of a padded batch [N, L_max]. Padding steps carry k = v = 0,
        # g = 0 and beta = 0, so they leave the state exactly as it was.
        rows, token_slots = _padded_layout(cu_seqlens, seq_len, q.device)
        q, k, v, g, beta = (_gather_padded(x[0], rows) for x in (q, k, v, g, beta))
    num_seqs, steps = q.shape[0], q.shape[1]

    if initial_state is None:
        state = q.new_zeros(num_seqs, heads, group, key_dim, value_dim)
    else:
        state = initial_state.to(dtype).view(num_seqs, heads, group, key_dim, value_dim)
    # [N, T, HV] -> [N, T, H, G, 1]: per value head scalars, broadcast over V.
    decays = g.exp().view(num_seqs, steps, heads, group, 1)
    betas = beta.view(num_seqs, steps, heads, group, 1)
    values = v.view(num_seqs, steps, heads, group, value_dim)
    qk = (q * k).sum(-1)[..., None, None]  # [N, T, H, 1, 1]

    outputs = []
    for t in range(steps):
        decay, k_t = decays[:, t], k[:, t]
        # One read of S_{t-1} serves both uses: S~^T k = alpha S^T k, and
        # S_t^T q = alpha S^T q + (k.q) delta (the rank-one update seen by q).
        read = torch.stack([k_t, q[:, t]], dim=-2)[:, :, None] @ state  # [N, H, G, 2, V]
        delta = betas[:, t] * (values[:, t] - decay * read[..., 0, :])  # [N, H, G, V]
        outputs.append(decay * read[..., 1, :] + qk[:, t] * delta)
        state = (k_t[:, :, None, :, None] * delta[:, :, :, None, :]).addcmul_(state, decay[..., None])

    o = torch.stack(outputs, dim=1).reshape(num_seqs, steps, value_heads, value_dim)
    if cu_seqlens is not None:
        o = o.reshape(num_seqs * steps, value_heads, value_dim)[token_slots][None]
    final_state = state.reshape(num_seqs, value_heads, key_dim, value_dim) if output_final_state else None
    return o.to(out_dtype), final_state


def _padded_layout(
    cu_seqlens: torch.Tensor, num_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between packed tokens and a padded [N, L_max] batch of documents.

    Returns rows [N, L_max] (the token at each padded slot, or num_tokens for padding) and
    token_slots [num_tokens] (the flat padded slot n * L_max + i of each token).
    """
    starts, lengths = document_bounds(cu_seqlens, 1, num_tokens)
    longest = max(lengths) if lengths else 0
    starts_t = torch.tensor(starts, device=device)[:, None]
    lengths_t = torch.tensor(lengths, device=device)[:, None]
    offsets = torch.arange(longest, device=device)[None]
    rows = torch.where(offsets < lengths_t, starts_t + offsets, num_tokens)
    token_slots = (torch.arange(len(starts), device=device)[:, None] * longest + offsets)[offsets < lengths_t]
    return rows, token_slots


def _gather_padded(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, ...] -> [N, L_max, ...] with zeros in the padding slots."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])])[rows]
