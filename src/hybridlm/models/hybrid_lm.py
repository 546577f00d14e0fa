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
from hybridlm.nn.attention import Attention, KVCache, KVCacheSlot, build_attention_mask, build_block_mask
from hybridlm.nn.blocks import AttentionBlock, GatedDeltaNetBlock
from hybridlm.nn.gated_deltanet import GatedDeltaNet
from hybridlm.nn.inference import HasInferenceWeights, rms_norm_fused, rotary_sign
from hybridlm.nn.norm import GatedRMSNorm, RMSNorm
from hybridlm.nn.rope import RotaryEmbedding
from hybridlm.ops.lm_loss import fused_lm_loss_sums


@dataclass
class CausalLMOutput:
    """logits: [B, T, vocab] (or the last `logits_to_keep` positions); hidden_states: the final normed
    hidden states [B, T, d_model] when asked for; cache: the (updated) decoding cache, if any.
    With labels (training): cross_entropy_sum and z_loss_sum, float32 scalars summed over the
    labelled positions (`hybridlm.ops.lm_loss.fused_lm_loss_sums`), and no logits."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    cache: HybridCache | None = None
    cross_entropy_sum: torch.Tensor | None = None
    z_loss_sum: torch.Tensor | None = None


# How attention applies documents and sliding windows (HybridLM.forward's attn_impl).
ATTN_IMPLS = ("auto", "flex", "sdpa")


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


class HybridLM(HasInferenceWeights, nn.Module):
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
        """A preallocated decoding cache for `batch_size` sequences of up to `max_length` tokens.

        Full-attention layers get max_length KV positions; sliding-window layers a ring buffer of
        min(max_length, sliding_window) positions; GDN layers their constant-size state.
        """
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
                ring = attn.sliding_window is not None
                capacity = min(max_length, attn.sliding_window) if ring else max_length
                layers.append(
                    KVCache.allocate(
                        batch_size, attn.n_kv_heads, capacity, attn.head_dim, device=device, dtype=dtype, ring=ring
                    )
                )
        return HybridCache(
            layers=layers,
            key_padding=torch.zeros(batch_size, max_length, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
            next_index=torch.zeros(1, dtype=torch.long, device=device),
        )

    # Derived inference weights --------------------------------------------------------------
    def prepare_for_inference(self) -> bool:
        """Build, or refresh from the current parameters, the derived weights of the fused decoding
        path (`decode_step(fused=True)`): stacked q/k/v (and GDN a/b) projections, gate constants,
        RoPE tables. They are not parameters: state_dict, save/load and
        training never see them (see `hybridlm.nn.inference`). In bf16 they take about
        (2 key_dim + value_dim) d_model per GDN layer and (H + 2 H_kv) head_dim d_model per attention
        layer of extra memory (0.5 GB for hybrid-1b).

        The fused path also builds them on first use and rebuilds them when a parameter changed;
        call this after changing parameters in ways the version counter does not see (`param.data`)
        and before capturing a CUDA graph. Once prepared (and while up to date), the GDN layers'
        prefill uses the stacked projection too. Returns True if any derived tensor was newly
        allocated (a CUDA graph captured with the old ones must be captured again); otherwise they
        were refilled in place.
        """
        reallocated = False
        for module in self.modules():
            if isinstance(module, HasInferenceWeights):
                reallocated |= module.refresh_inference_weights()
        return reallocated

    def release_inference_weights(self) -> None:
        """Free the derived weights of every layer (the fused decoding path builds them again when
        next used)."""
        for module in self.modules():
            if isinstance(module, HasInferenceWeights):
                module.drop_inference_weights()

    def _inference_sources(self) -> list[torch.Tensor]:
        return [rotary.inv_freq for rotary in (self.rotary, self.rotary_full) if rotary is not None]

    def _build_inference_weights(self) -> dict[str, torch.Tensor]:
        """inv_freq (inv_freq_full): RoPE inverse frequencies repeated to head_dim; rotary_sign: see
        `hybridlm.nn.inference.rotary_sign`."""
        weights = {}
        if self.rotary is not None:
            weights["inv_freq"] = torch.cat([self.rotary.inv_freq, self.rotary.inv_freq])
            weights["rotary_sign"] = rotary_sign(self.config.head_dim, device=self.rotary.inv_freq.device)
        if self.rotary_full is not None:
            weights["inv_freq_full"] = torch.cat([self.rotary_full.inv_freq, self.rotary_full.inv_freq])
        return weights

    def _decode_rotary(self, positions: torch.Tensor, *, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`RotaryEmbedding.forward` for positions [B, 1] in fewer kernels: (cos, signed_sin) float32
        [B, 1, head_dim], the sin's first half negated (for `apply_rotary_fused`)."""
        weights = self.inference_weights()
        rotary = self.rotary_full if full else self.rotary
        angles = positions.float()[..., None] * weights["inv_freq_full" if full else "inv_freq"]
        cos, sin = angles.cos(), angles.sin()
        if rotary.attention_factor != 1.0:
            cos, sin = cos * rotary.attention_factor, sin * rotary.attention_factor
        return cos, sin * weights["rotary_sign"]

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
        attn_impl: str = "auto",
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> CausalLMOutput:
        """Run the model.

        input_ids: [B, T] int64.
        attention_mask: [B, T] (1/True = real token, 0 = padding; padding must be on the left). With a
            cache it covers only these new tokens; earlier padding is remembered by the cache.
        doc_ids: [B, T] document ids for intra-document masking of packed sequences (training): GDN
            layers restart at each boundary and attention is block-diagonal causal. Not with a cache.
        cache: a `HybridCache` from `allocate_cache`, updated in place (prefill or decode).
        logits_to_keep: compute logits only for the last n positions.
        gdn_impl: the `gated_delta_rule` backend of the GDN layers ("auto": hybridlm.ops decides).
        attn_impl: how attention layers apply documents and sliding windows without a cache or
            padding: "flex" (flex attention with a block mask), "sdpa" (a dense boolean mask), or
            "auto" (flex on CUDA when gradients are enabled, i.e. training; sdpa otherwise). Plain
            causal attention always runs SDPA's causal kernel.
        labels: [B, T] int64 next-token targets (ignore_index where there is none): return the sums
            of cross-entropy and z-loss instead of logits, through the fused LM-head loss, which
            never holds float32 logits (`hybridlm.ops.lm_loss`). Not with a cache or logits_to_keep.
        """
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}; got {attn_impl!r}")
        self._check_input(input_ids, attention_mask, doc_ids, cache)
        if labels is not None and (labels.shape != input_ids.shape or cache is not None or logits_to_keep is not None):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)} and come without a cache or "
                f"logits_to_keep; got labels {tuple(labels.shape)}, cache {cache is not None}, "
                f"logits_to_keep {logits_to_keep}"
            )
        batch, seq_len = input_ids.shape
        device = input_ids.device
        hidden = self.model.embed_tokens(input_ids)

        padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding = attention_mask.bool()
        # First key position each attention kind sees: 0, or for a sliding-window ring buffer the
        # oldest position it still holds and returns (KVCache.window_keys).
        first_key = {kind: 0 for kind in ("attn", "swa")}
        if cache is None:
            key_length = seq_len
            key_padding = padding
            if padding is None:
                positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
            else:
                positions = (padding.long().cumsum(1) - 1).clamp(min=0)
        else:
            start = cache.begin_write(seq_len)
            key_length = start + seq_len
            new_real = torch.ones(batch, seq_len, dtype=torch.bool, device=device) if padding is None else padding
            cache.key_padding[:, start:key_length] = new_real
            positions = cache.positions[:, None] + new_real.long().cumsum(1) - 1
            positions = positions.clamp(min=0)
            cache.positions += new_real.long().sum(1)
            key_padding = cache.key_padding[:, :key_length] if cache.has_padding() else None
            for layer in cache.layers:
                if isinstance(layer, KVCache) and layer.ring:
                    first_key["swa"] = start - layer.window_keys(start)

        masks = {}
        # auto: flex for training on GPUs, whose shapes repeat (flex is compiled per shape); calls
        # without gradients (evaluation, generation at varying lengths) keep the dense mask.
        use_flex = attn_impl == "flex" or (attn_impl == "auto" and device.type == "cuda" and torch.is_grad_enabled())
        for kind in set(self.config.layer_kinds) - {"gdn"}:
            window = self.config.sliding_window if kind == "swa" else None
            if use_flex and cache is None and padding is None and (doc_ids is not None or window is not None):
                masks[kind] = build_block_mask(
                    batch=batch, seq_len=seq_len, doc_ids=doc_ids, sliding_window=window, device=device
                )
                continue
            masks[kind] = build_attention_mask(
                query_length=seq_len,
                key_length=key_length - first_key[kind],
                key_padding=None if key_padding is None else key_padding[:, first_key[kind] :],
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
        if not return_hidden_states and labels is None:  # the final norm only where logits are computed (prefill: none or 1)
            if not compute_logits:
                return CausalLMOutput(logits=None, cache=cache)
            if logits_to_keep is not None:
                hidden = hidden[:, -logits_to_keep:]
        hidden = self.model.norm(hidden)
        if labels is not None:
            cross_entropy, z_loss = fused_lm_loss_sums(hidden, self.lm_head.weight, labels, ignore_index=ignore_index)
            return CausalLMOutput(logits=None, hidden_states=hidden if return_hidden_states else None,
                                  cross_entropy_sum=cross_entropy, z_loss_sum=z_loss)
        logits = None
        if compute_logits:
            kept = hidden if logits_to_keep is None else hidden[:, -logits_to_keep:]
            logits = self.lm_head(kept)
        return CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden_states else None, cache=cache)

    def decode_step(
        self, input_ids: torch.Tensor, cache: HybridCache, *, gdn_impl: str = "auto", fused: bool = True
    ) -> torch.Tensor:
        """One decoding step with static shapes and no host synchronisation, for CUDA-graph capture.

        input_ids: [B, 1] int64, the latest token of every sequence (no padding: every row advances).
        cache: a `HybridCache` after a prefill with `forward`; updated in place.
        fused: run every block's fused `decode` (stacked projections, torch's fused RMSNorm, shorter
            RoPE, and on GPUs Triton kernels that advance the GDN states in place), with the derived
            weights of `prepare_for_inference` (built on first use). False runs the blocks' reference
            `forward` instead: same result up to float rounding, more kernels. Without gradients.
        Returns logits [B, vocab] for the next token, in the model's dtype.

        Equal to `forward(input_ids, cache=cache).logits[:, -1]`, but every per-step quantity stays on
        the device: the write position is `cache.next_index`, attention spans each layer's whole
        preallocated buffer under a key mask built from `cache.key_padding`, and inputs are not checked
        (ids must lie in [0, vocab_size) and the cache must have room: the caller checks once).
        """
        if fused and torch.is_grad_enabled():
            raise ValueError(
                "decode_step(fused=True) uses derived weights that carry no gradient; call it under "
                "torch.no_grad() (or pass fused=False)"
            )
        position = cache.next_index
        cache.key_padding.index_fill_(1, position, True)
        rotary = rotary_full = None
        if self.rotary is not None:
            token_positions = cache.positions[:, None]
            if fused:
                rotary = self._decode_rotary(token_positions, full=False)
                if self.rotary_full is not None:
                    rotary_full = self._decode_rotary(token_positions, full=True)
                else:
                    rotary_full = rotary
            else:
                rotary = self.rotary(token_positions)
                rotary_full = self.rotary_full(token_positions) if self.rotary_full is not None else rotary
        hidden = self.model.embed_tokens(input_ids)
        masks = {}
        for block, state in zip(self.model.layers, cache.layers):
            if isinstance(block, GatedDeltaNetBlock):
                step = block.decode if fused else block
                hidden = step(hidden, state=state, gdn_impl=gdn_impl)
                continue
            if state.capacity not in masks:
                masks[state.capacity] = self._decode_key_mask(cache, state.capacity)
            step = block.decode if fused else block
            hidden = step(
                hidden,
                rotary=rotary_full if block.kind == "attn" else rotary,
                mask=masks[state.capacity],
                state=KVCacheSlot(state, position),
            )
        cache.positions += 1
        cache.next_index += 1
        last, norm = hidden[:, -1], self.model.norm
        return self.lm_head(rms_norm_fused(last, norm.weight, norm.eps) if fused else norm(last))

    @staticmethod
    def _decode_key_mask(cache: HybridCache, capacity: int) -> torch.Tensor:
        """[B, 1, 1, capacity] bool: which slots of a KV buffer the current query may attend to.

        Slot s holds the latest position p' <= p (p = cache.next_index) with p' = s mod capacity; it
        counts when that position was written (p' >= 0) and is a real token. For a full-length buffer
        this is the key padding itself; for a ring buffer (capacity <= window) every held position is
        inside the window.
        """
        if capacity == cache.capacity:  # slots are positions; unwritten ones are still False
            return cache.key_padding[:, None, None, :]
        slots = torch.arange(capacity, device=cache.key_padding.device)
        held = cache.next_index - (cache.next_index - slots) % capacity
        real = cache.key_padding.index_select(1, held.clamp(min=0)) & (held >= 0)
        return real[:, None, None, :]

    def generate(self, input_ids, attention_mask: torch.Tensor | None = None, **options):
        """Generate continuations of (left-padded) prompts; see `hybridlm.generate.generate` for the
        options (max_new_tokens, temperature, top_k, top_p, stop_token_ids, seed, return_stats, ...)."""
        from hybridlm.generate import generate

        return generate(self, input_ids, attention_mask, **options)

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
