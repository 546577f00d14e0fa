"""`HybridLM`: embeddings -> a stack of GDN / attention blocks -> final RMSNorm -> LM head.

Module names equal the Hugging Face Olmo Hybrid checkpoint names (`model.layers.3.self_attn.q_proj`,
`model.layers.0.linear_attn.q_conv1d`, `lm_head`, ...), so a state dict loads without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hybridlm.models.cache import HybridCache
from hybridlm.models.config import HybridConfig
from hybridlm.nn.attention import Attention, KVCache, build_attention_mask
from hybridlm.nn.blocks import AttentionBlock, GatedDeltaNetBlock
from hybridlm.nn.gated_deltanet import GatedDeltaNet
from hybridlm.nn.norm import GatedRMSNorm, RMSNorm
from hybridlm.nn.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    """logits: [B, T, vocab] (or the last `logits_to_keep` positions); hidden_states: the final normed
    hidden states [B, T, d_model] when asked for; cache: the (updated) decoding cache, if any."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    cache: HybridCache | None = None


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document offsets [N+1] (int64) over the flattened [B, T] batch; every row start is a boundary."""
    batch, seq_len = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().squeeze(1)
    return torch.cat([offsets, offsets.new_tensor([batch * seq_len])])


class HybridBackbone(nn.Module):
    """The `model.` part of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([build_block(config, kind) for kind in config.layer_kinds])
        self.norm = RMSNorm(config.d_model, config.norm_eps)


def build_block(config: HybridConfig, kind: str) -> nn.Module:
    if kind == "gdn":
        mixer = GatedDeltaNet(
            config.d_model,
            key_heads=config.gdn_key_heads,
            value_heads=config.gdn_value_heads,
            key_head_dim=config.gdn_key_head_dim,
            value_head_dim=config.gdn_value_head_dim,
            conv_size=config.gdn_conv_size,
            neg_eigval=config.gdn_neg_eigval,
            use_decay=config.gdn_use_decay,
            use_output_gate=config.gdn_use_output_gate,
            norm_eps=config.gdn_norm_eps,
        )
        return GatedDeltaNetBlock(config.d_model, config.mlp_hidden, mixer, config.norm_eps)
    mixer = Attention(
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        qk_norm=config.qk_norm,
        norm_eps=config.norm_eps,
        sliding_window=config.sliding_window if kind == "swa" else None,
    )
    return AttentionBlock(config.d_model, config.mlp_hidden, mixer, config.norm_eps, kind)


class HybridLM(nn.Module):
    """A causal language model of the hybrid family described by a `HybridConfig`."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.model = HybridBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = None
        self.rotary_full = None
        if config.rope_theta is not None and config.has_attention:
            # RoPE scaling (YaRN) applies to full-attention layers only, as in Olmo 3.
            self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
            if config.rope_scaling is not None:
                self.rotary_full = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.init_weights()

    # Construction ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """A fresh initialisation for training from scratch.

        Linear and embedding weights ~ normal(0, init_std) truncated at 3 std; the last projection of
        every residual branch (attention and GDN o_proj, MLP down_proj) is scaled by 1/sqrt(2 n_layers)
        (GPT-2 / Llama practice, as OLMo-core does); norms are ones; conv weights keep nn.Conv1d's
        default; A_log and dt_bias follow the reference (A ~ U(0, 16), dt log-uniform in [1e-3, 0.1]).
        """
        config = self.config
        std = config.init_std
        residual_std = std / math.sqrt(2 * config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "down_proj"))
                s = residual_std if is_output else std
                nn.init.trunc_normal_(module.weight, mean=0.0, std=s, a=-3 * s, b=3 * s)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                module.weight.fill_(1.0)
            elif isinstance(module, GatedDeltaNet):
                module.reset_gates(config.gdn_a_log_range, config.gdn_dt_range, config.gdn_dt_init_floor)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32, device=None) -> "HybridLM":
        """Load a Hugging Face format checkpoint (model_type `olmo_hybrid` or `olmo3`), or a hybridlm
        run directory's exported model. dtype="auto" keeps the stored dtype."""
        from hybridlm.interop.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the Hugging Face format (config.json + safetensors), loadable by transformers'
        `OlmoHybridForCausalLM` (or `Olmo3ForCausalLM` for a pure sliding/full attention model)."""
        from hybridlm.interop.hf import save_pretrained

        save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    # Introspection --------------------------------------------------------------------------
    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count. exclude_embeddings drops the input embedding only (the LM head counts, as in
        the scaling-ladder tables and the 6N FLOPs rule)."""
        seen = set()
        total = 0
        for name, param in self.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if exclude_embeddings and name == "model.embed_tokens.weight":
                continue
            total += param.numel()
        return total

    def allocate_cache(
        self, batch_size: int, max_length: int, *, device=None, dtype: torch.dtype | None = None
    ) -> HybridCache:
        """A preallocated decoding cache for `batch_size` sequences of up to `max_length` tokens."""
        if max_length > self.config.max_seq_len:
            raise ValueError(
                f"max_length {max_length} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        reference = self.lm_head.weight
        device = reference.device if device is None else device
        dtype = reference.dtype if dtype is None else dtype
        layers = []
        for block in self.model.layers:
            if isinstance(block, GatedDeltaNetBlock):
                layers.append(block.linear_attn.init_state(batch_size, device=device, dtype=dtype))
            else:
                attn = block.self_attn
                layers.append(
                    KVCache.allocate(batch_size, attn.n_kv_heads, max_length, attn.head_dim, device=device, dtype=dtype)
                )
        return HybridCache(
            layers=layers,
            key_padding=torch.zeros(batch_size, max_length, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    # Forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        logits_to_keep: int | None = None,
        return_hidden_states: bool = False,
        compute_logits: bool = True,
        gdn_impl: str = "auto",
    ) -> CausalLMOutput:
        """Run the model.

        input_ids: [B, T] int64.
        attention_mask: [B, T] (1/True = real token, 0 = padding; padding must be on the left). With a
            cache it covers only these new tokens; earlier padding is remembered by the cache.
        doc_ids: [B, T] document ids for intra-document masking of packed sequences (training): GDN
            layers restart at each boundary and attention is block-diagonal causal. Not with a cache.
        cache: a `HybridCache` from `allocate_cache`, updated in place (prefill or decode).
        logits_to_keep: compute logits only for the last n positions.
        """
        self._check_input(input_ids, attention_mask, doc_ids, cache)
        batch, seq_len = input_ids.shape
        device = input_ids.device
        hidden = self.model.embed_tokens(input_ids)

        padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding = attention_mask.bool()
        if cache is None:
            key_length = seq_len
            key_padding = padding
            if padding is None:
                positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
            else:
                positions = (padding.long().cumsum(1) - 1).clamp(min=0)
        else:
            start = cache.length
            key_length = start + seq_len
            if key_length > cache.capacity:
                raise ValueError(
                    f"the cache holds {cache.capacity} positions; {cache.length} used and {seq_len} more requested"
                )
            new_real = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if padding is None else padding
            cache.key_padding[:, start:key_length] = new_real
            positions = cache.positions[:, None] + new_real.long().cumsum(1) - 1
            positions = positions.clamp(min=0)
            cache.positions += new_real.long().sum(1)
            cache.length = key_length
            key_padding = cache.key_padding[:, :key_length] if cache.has_padding() else None

        masks = {}
        for kind in set(self.config.layer_kinds) - {"gdn"}:
            masks[kind] = build_attention_mask(
                query_length=seq_len,
                key_length=key_length,
                key_padding=key_padding,
                doc_ids=doc_ids,
                sliding_window=self.config.sliding_window if kind == "swa" else None,
                device=device,
            )
        rotary = rotary_full = None
        if self.rotary is not None:
            rotary = self.rotary(positions)
            rotary_full = self.rotary_full(positions) if self.rotary_full is not None else rotary
        cu_seqlens = cu_seqlens_from_doc_ids(doc_ids) if doc_ids is not None else None

        for index, block in enumerate(self.model.layers):
            state = None if cache is None else cache.layers[index]
            if isinstance(block, GatedDeltaNetBlock):
                hidden = block(hidden, padding_mask=padding, cu_seqlens=cu_seqlens, state=state, gdn_impl=gdn_impl)
            else:
                hidden = block(
                    hidden,
                    rotary=rotary_full if block.kind == "attn" else rotary,
                    mask=masks[block.kind],
                    state=state,
                )
        hidden = self.model.norm(hidden)
        logits = None
        if compute_logits:
            kept = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
            logits = self.lm_head(kept)
        return CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden_states else None, cache=cache)

    def _check_input(self, input_ids, attention_mask, doc_ids, cache) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, T]; got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}) (the model's vocab_size); "
                f"got values from {low} to {high}"
            )
        for name, tensor in (("attention_mask", attention_mask), ("doc_ids", doc_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(tensor.shape)}")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a decoding cache")
        if doc_ids is not None and attention_mask is not None:
            raise ValueError("give either doc_ids (packed documents) or attention_mask (padding), not both")
        total = input_ids.shape[1] + (cache.length if cache is not None else 0)
        if total > self.config.max_seq_len:
            raise ValueError(f"sequence length {total} exceeds the model's max_seq_len {self.config.max_seq_len}")
