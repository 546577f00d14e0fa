"""The two block types of Olmo Hybrid. Their norm placement differs, and so does the meaning of
`post_attention_layernorm` (the checkpoint name is shared):

- GDN block, pre-norm:         h = x + GDN(input_layernorm(x));  out = h + MLP(post_attention_layernorm(h))
- Attention block, post-norm:  h = x + post_attention_layernorm(Attn(x));  out = h + post_feedforward_layernorm(MLP(h))

Each block also has `decode`, the fused one-token step of `HybridLM.decode_step`: the mixer's own
`decode` and torch's fused RMSNorm (`hybridlm.nn.inference.rms_norm_fused`).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.nn.attention import Attention, KVCache, KVCacheSlot
from hybridlm.nn.gated_deltanet import GatedDeltaNet, GDNState
from hybridlm.nn.inference import rms_norm_fused
from hybridlm.nn.mlp import SwiGLU
from hybridlm.nn.norm import RMSNorm


class GatedDeltaNetBlock(nn.Module):
    kind = "gdn"

    def __init__(self, d_model: int, mlp_hidden: int, mixer: GatedDeltaNet, norm_eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(d_model, norm_eps)
        self.linear_attn = mixer
        self.post_attention_layernorm = RMSNorm(d_model, norm_eps)  # the pre-MLP norm in this block
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: GDNState | None = None,
        gdn_impl: str = "auto",
    ) -> torch.Tensor:
        h = x + self.linear_attn(
            self.input_layernorm(x), padding_mask=padding_mask, cu_seqlens=cu_seqlens, state=state, impl=gdn_impl
        )
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, x: torch.Tensor, *, state: GDNState, gdn_impl: str = "auto") -> torch.Tensor:
        """One fused decoding step: x [B, 1, d_model] -> [B, 1, d_model], `state` advanced in place."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = x + self.linear_attn.decode(rms_norm_fused(x, norm1.weight, norm1.eps), state, impl=gdn_impl)
        return h + self.mlp(rms_norm_fused(h, norm2.weight, norm2.eps))


class AttentionBlock(nn.Module):
    def __init__(self, d_model: int, mlp_hidden: int, mixer: Attention, norm_eps: float, kind: str):
        super().__init__()
        self.kind = kind
        self.self_attn = mixer
        self.post_attention_layernorm = RMSNorm(d_model, norm_eps)  # norms the attention output here
        self.post_feedforward_layernorm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        state: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.post_attention_layernorm(self.self_attn(x, rotary=rotary, mask=mask, kv_cache=state))
        return h + self.post_feedforward_layernorm(self.mlp(h))

    def decode(
        self,
        x: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        state: KVCacheSlot,
    ) -> torch.Tensor:
        """One fused decoding step: x [B, 1, d_model] -> [B, 1, d_model]; rotary is (cos, signed_sin)."""
        norm1, norm2 = self.post_attention_layernorm, self.post_feedforward_layernorm
        attended = self.self_attn.decode(x, rotary=rotary, mask=mask, kv_cache=state)
        h = x + rms_norm_fused(attended, norm1.weight, norm1.eps)
        return h + rms_norm_fused(self.mlp(h), norm2.weight, norm2.eps)
