"""The two block types of Olmo Hybrid. Their norm placement differs, and so does the meaning of
`post_attention_layernorm` (the checkpoint name is shared):

- GDN block, pre-norm:         h = x + GDN(input_layernorm(x));  out = h + MLP(post_attention_layernorm(h))
- Attention block, post-norm:  h = x + post_attention_layernorm(Attn(x));  out = h + post_feedforward_layernorm(MLP(h))
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.nn.attention import Attention, KVCache
from hybridlm.nn.gated_deltanet import GatedDeltaNet, GDNState
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
