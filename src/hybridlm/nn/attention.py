"""Causal softmax attention with QK-norm, optional RoPE (or NoPE), GQA, sliding window,
document masking, padding, and a preallocated KV cache for decoding.

`Attention.forward` is the reference path; `Attention.decode` the fused one-token step for
generation (q/k/v in one matmul with a derived weight, torch's fused RMSNorm, a shorter RoPE).

Masks: plain causal attention runs PyTorch's SDPA with `is_causal` (flash attention on GPUs); other
masks are either a dense boolean mask (`build_attention_mask`, SDPA's masked kernels) or, for
training-style calls with documents or a sliding window, a flex-attention `BlockMask`
(`build_block_mask`), which skips fully masked 128 x 128 blocks and never materialises T x T.
`HybridLM.forward(attn_impl=...)` chooses: "auto" takes flex on CUDA for training (gradients on),
"sdpa" always the dense mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from hybridlm.nn.inference import HasInferenceWeights, apply_rotary_fused, rms_norm_fused
from hybridlm.nn.norm import RMSNorm
from hybridlm.nn.rope import apply_rotary


@dataclass
class KVCache:
    """Preallocated keys and values of one attention layer.

    keys, values: [B, H_kv, capacity, head_dim]. All sequences of a batch share `length` (left padding
    is masked out by the model's key-padding mask).

    A full-attention layer holds every position (`ring=False`, position p in slot p). A sliding-window
    layer keeps a ring buffer (`ring=True`): position p lives in slot p % capacity with capacity =
    min(max_length, window), so its memory stops growing at the window.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    ring: bool = False

    @classmethod
    def allocate(
        cls, batch: int, kv_heads: int, capacity: int, head_dim: int, *, device, dtype, ring: bool = False
    ) -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), ring=ring
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, H_kv, T, D]; return the keys/values the new queries may see, in order.

        Full attention: everything cached so far ([0, length + T)). Ring buffer: the last
        `window_keys(length)` old positions followed by the T new ones (the window of the first new
        query reaches capacity - 1 positions back).
        """
        start, count = self.length, keys.shape[2]
        end = start + count
        if not self.ring:
            if end > self.capacity:
                raise ValueError(
                    f"KV cache overflow: {end} positions needed but the cache holds {self.capacity}; "
                    f"allocate the cache with a larger max_length"
                )
            self.keys[:, :, start:end] = keys
            self.values[:, :, start:end] = values
            self.length = end
            return self.keys[:, :, :end], self.values[:, :, :end]
        old = self.window_keys(start)
        if end <= self.capacity:  # not wrapped yet: slots are positions, a view suffices
            self.keys[:, :, start:end] = keys
            self.values[:, :, start:end] = values
            self.length = end
            return self.keys[:, :, start - old : end], self.values[:, :, start - old : end]
        old_slots = torch.arange(start - old, start, device=keys.device) % self.capacity
        seen_keys = torch.cat([self.keys.index_select(2, old_slots), keys], dim=2)
        seen_values = torch.cat([self.values.index_select(2, old_slots), values], dim=2)
        kept = min(count, self.capacity)
        new_slots = torch.arange(end - kept, end, device=keys.device) % self.capacity
        self.keys.index_copy_(2, new_slots, keys[:, :, count - kept :])
        self.values.index_copy_(2, new_slots, values[:, :, count - kept :])
        self.length = end
        return seen_keys, seen_values

    def window_keys(self, start: int) -> int:
        """How many positions before `start` a ring buffer returns with the next new keys."""
        return min(start, self.capacity - 1) if self.ring else start

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


@dataclass
class KVCacheSlot:
    """A one-token write into a `KVCache` at a position held on the device (static-shape decoding).

    Used by `HybridLM.decode_step` so that a CUDA graph can replay the step: the slot comes from
    `position` (a [1] int64 tensor advanced in place by the model), and attention spans the whole
    buffer, with unwritten and out-of-window slots masked by the model. The cache's host-side
    `length` is not touched.
    """

    cache: KVCache
    position: torch.Tensor

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [B, H_kv, 1, D] -> the whole buffers [B, H_kv, capacity, D]."""
        # A full buffer has room for every position (the caller checks), so slots are positions.
        slot = self.position % self.cache.capacity if self.cache.ring else self.position
        self.cache.keys.index_copy_(2, slot, keys)
        self.cache.values.index_copy_(2, slot, values)
        return self.cache.keys, self.cache.values


class Attention(HasInferenceWeights, nn.Module):
    """Multi-head / grouped-query causal attention of Olmo 2/3 and Olmo Hybrid.

    QK-norm is an RMSNorm over the whole q (and k) projection before the head split (`qk_norm="full"`,
    weights [H*hd] and [H_kv*hd]), or per head (`"head"`, weights [hd]), or off.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qk_norm: str = "full",
        norm_eps: float = 1e-6,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        if qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * head_dim, norm_eps)
            self.k_norm = RMSNorm(n_kv_heads * head_dim, norm_eps)
        elif qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | KVCacheSlot | None = None,
    ) -> torch.Tensor:
        """x: [B, T, d_model] -> [B, T, d_model].

        rotary: float32 (cos, sin) [B, T, head_dim] for these tokens, or None (NoPE).
        mask: boolean [B or 1, 1, T, T_keys] (True = may attend), or None for plain causal attention
            over exactly these T tokens. The model builds it (it knows padding, documents, windows).
            Or a flex-attention `BlockMask` (`build_block_mask`) over exactly these T tokens.
        kv_cache: this layer's cache; new keys/values are appended and attention spans what it returns.
        """
        batch, seq_len, _ = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        grouped = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):
            if kv_cache is not None:
                raise ValueError("a flex-attention BlockMask covers no KV cache; build a dense mask for cached calls")
            dtype = v.dtype  # RoPE and the norms may have promoted q, k to float32 under autocast
            out = flex_attention_fn(q.is_cuda)(
                q.to(dtype), k.to(dtype), v, block_mask=mask, scale=self.head_dim**-0.5, enable_gqa=grouped
            )
        elif mask is None:
            if k.shape[2] != seq_len:
                raise ValueError("attention over a KV cache needs an explicit mask from the model")
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.head_dim**-0.5, enable_gqa=grouped
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=grouped
            )
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def _inference_sources(self) -> list[torch.Tensor]:
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]

    def _build_inference_weights(self) -> dict[str, torch.Tensor]:
        """qkv_proj [(H + 2 H_kv) head_dim, d_model]: the q|k|v projections stacked."""
        return {"qkv_proj": torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])}

    def decode(
        self,
        x: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor,
        kv_cache: KVCacheSlot,
    ) -> torch.Tensor:
        """One decoding step, fused: x [B, 1, d_model] -> [B, 1, d_model]; equal to `forward` up to
        float rounding, in fewer kernels.

        rotary: float32 (cos, signed_sin) [B, 1, head_dim] (see `hybridlm.nn.inference.apply_rotary_fused`),
            or None (NoPE). mask: [B, 1, 1, capacity] bool over the cache slots.
        kv_cache: the slot this token's key and value go to. Without gradients (derived weights).
        """
        batch = x.shape[0]
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = F.linear(x, self.inference_weights()["qkv_proj"]).split([q_width, kv_width, kv_width], dim=-1)
        if self.qk_norm == "full":
            q, k = self._decode_qk_norm(q, k)
        q = q.view(batch, 1, self.n_heads, self.head_dim)
        k = k.view(batch, 1, self.n_kv_heads, self.head_dim)
        v = v.view(batch, 1, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self._decode_qk_norm(q, k)
        if rotary is not None:
            cos, signed_sin = rotary
            q, k = apply_rotary_fused(q, cos, signed_sin), apply_rotary_fused(k, cos, signed_sin)
        keys, values = kv_cache.append(k.transpose(1, 2), v.transpose(1, 2))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values,
            attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, q_width))

    def _decode_qk_norm(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_norm, k_norm = self.q_norm, self.k_norm
        return rms_norm_fused(q, q_norm.weight, q_norm.eps), rms_norm_fused(k, k_norm.weight, k_norm.eps)


_COMPILED_FLEX = None


def flex_attention_fn(cuda: bool):
    """flex_attention, compiled once on CUDA (its fused kernels exist only compiled); eager on CPU,
    where it materialises the scores (used for tests and small models only)."""
    global _COMPILED_FLEX
    if cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return eager


def build_block_mask(
    *, batch: int, seq_len: int, doc_ids: torch.Tensor | None = None, sliding_window: int | None = None,
    device: torch.device,
) -> BlockMask:
    """The flex-attention equivalent of `build_attention_mask` for T queries over the same T keys
    without padding: causal, within a document (doc_ids [B, T]) and within the window (a query sees
    itself and window-1 earlier keys)."""

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return allowed

    return create_block_mask(
        mask_mod, B=batch if doc_ids is not None else None, H=None, Q_LEN=seq_len, KV_LEN=seq_len,
        device=device, _compile=device.type == "cuda",
    )


def build_attention_mask(
    *,
    query_length: int,
    key_length: int,
    key_padding: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Tq, Tk] (True = attend) for queries that are the last Tq of Tk keys.

    Combines causality, an optional sliding window (a query sees itself and window-1 earlier keys),
    document boundaries (doc_ids [B, T], no cache) and key padding (key_padding [B, Tk], True for real
    tokens). Returns None when plain causal attention over the same tokens suffices. A query whose
    every key is masked (a padding query in a left-padded row) keeps its own position so softmax
    never sees an all-masked row; such outputs belong to padding and are ignored.
    """
    if key_padding is None and doc_ids is None and sliding_window is None and query_length == key_length:
        return None
    offset = key_length - query_length
    query_pos = torch.arange(query_length, device=device)[:, None] + offset
    key_pos = torch.arange(key_length, device=device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed = allowed & (query_pos - key_pos < sliding_window)
    allowed = allowed[None, None]
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        allowed = allowed & same_doc[:, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
        allowed = allowed | (key_pos == query_pos)[None, None]
    return allowed
