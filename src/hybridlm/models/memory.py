"""Decoding memory of a configuration, computed without building the model.

Matches what `HybridLM.allocate_cache` allocates: per GDN layer a conv state [C, W-1] in the
activation dtype and a float32 recurrent state [HV, K, V]; per full-attention layer keys and values
[H_kv, context, head_dim] in the activation dtype; per sliding-window layer a ring buffer of
[H_kv, min(context, window), head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.models.config import HybridConfig


@dataclass
class DecodingMemory:
    recurrent_bytes: int  # GDN conv + recurrent states; constant in the context length
    kv_bytes: int  # attention KV cache at this context length
    kv_bytes_per_token: int  # growth per token of context: full-attention layers, plus sliding-window
    # layers while the context is shorter than the window

    @property
    def total_bytes(self) -> int:
        return self.recurrent_bytes + self.kv_bytes


def decoding_memory(
    config: HybridConfig, context_length: int, *, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16
) -> DecodingMemory:
    """Cache bytes for `batch_size` sequences of `context_length` tokens with activations in `dtype`."""
    element = torch.empty((), dtype=dtype).element_size()
    n_gdn = sum(kind == "gdn" for kind in config.layer_kinds)
    n_full = sum(kind == "attn" for kind in config.layer_kinds)
    n_window = sum(kind == "swa" for kind in config.layer_kinds)
    recurrent = 0
    if n_gdn:
        conv_channels = 2 * config.gdn_key_dim + config.gdn_value_dim
        conv = conv_channels * (config.gdn_conv_size - 1) * element
        state = config.gdn_value_heads * config.gdn_key_head_dim * config.gdn_value_head_dim * 4
        recurrent = n_gdn * (conv + state) * batch_size
    per_layer_token = 2 * config.n_kv_heads * config.head_dim * element if n_full or n_window else 0
    window_tokens = min(context_length, config.sliding_window) if n_window else 0
    kv = (n_full * context_length + n_window * window_tokens) * per_layer_token
    growing_layers = n_full + (n_window if context_length < config.sliding_window else 0)
    return DecodingMemory(
        recurrent_bytes=recurrent,
        kv_bytes=kv * batch_size,
        kv_bytes_per_token=growing_layers * per_layer_token * batch_size,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
