"""The gated delta rule written as plainly as possible, in float64: the ground truth for tests.

One token at a time, one document at a time, straight from the definition:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      S: [K, V] per value head
    o_t = S_t^T (scale * q_t)

No chunking, no WY form, no clever reordering: slow, but each line is the equation above.
Differentiable (plain autograd), so float64 gradients of the recurrence come from it too.
"""

from __future__ import annotations

import torch


def naive_gated_delta_rule(
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
    """Reference gated delta rule; same arguments as `gated_delta_rule`, no input checks.

    Args:
        q, k: [B, T, H, K]; v: [B, T, HV, V] with HV a multiple of H; g (log decay), beta: [B, T, HV].
        initial_state: [N, HV, K, V] (N = B, or the number of documents with cu_seqlens).
        cu_seqlens: [N+1] document offsets (B == 1); the state restarts at every document.
    Returns:
        (o [B, T, HV, V] float64, final state [N, HV, K, V] float64 or None).
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    batch, seq_len, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if scale is None:
        scale = key_dim**-0.5
    if use_qk_l2norm:
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * scale
    # Value head j reads query/key head j // (HV / H).
    q = q.repeat_interleave(value_heads // heads, dim=2)
    k = k.repeat_interleave(value_heads // heads, dim=2)

    if cu_seqlens is None:
        documents = [(b, 0, seq_len) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        documents = [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]

    outputs = [[None] * seq_len for _ in range(batch)]
    final_states = []
    for n, (b, start, end) in enumerate(documents):
        if initial_state is None:
            state = q.new_zeros(value_heads, key_dim, value_dim)
        else:
            state = initial_state[n].double()
        for t in range(start, end):
            k_t, v_t = k[b, t][:, :, None], v[b, t][:, None, :]  # [HV, K, 1], [HV, 1, V]
            decay = g[b, t].exp()[:, None, None]
            strength = beta[b, t][:, None, None]
            # exp(g) (I - beta k k^T) S + beta k v^T, with (I - beta k k^T) S = S - beta k (k^T S).
            state = decay * (state - strength * k_t * (k_t.transpose(-1, -2) @ state)) + strength * k_t * v_t
            outputs[b][t] = (state.transpose(-1, -2) @ q[b, t][:, :, None]).squeeze(-1)  # S^T q: [HV, V]
        final_states.append(state)
    o = torch.stack([torch.stack(row) for row in outputs])
    final_state = torch.stack(final_states) if output_final_state else None
    return o, final_state
