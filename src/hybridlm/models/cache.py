"""The decoding cache of a hybrid model: constant-size state for GDN layers, KV for attention layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridlm.nn.attention import KVCache
from hybridlm.nn.gated_deltanet import GDNState


@dataclass
class HybridCache:
    """Per-layer decoding state plus what the model needs to continue a batch.

    layers: one `GDNState` (conv state + float32 recurrent state) per GDN layer and one preallocated
        `KVCache` per attention layer, in layer order.
    key_padding: [B, capacity] bool, True where a real (non-padding) token was written.
    positions: [B] int64, the number of real tokens seen per sequence (the next RoPE position).
    length: how many positions (padding included) have been written.
    """

    layers: list[GDNState | KVCache]
    key_padding: torch.Tensor
    positions: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.key_padding.shape[1]

    @property
    def batch_size(self) -> int:
        return self.key_padding.shape[0]

    def has_padding(self) -> bool:
        return not bool(self.key_padding[:, : self.length].all())

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {"recurrent": GDN conv + recurrent states, "kv": attention caches, "total": ...}."""
        recurrent = sum(layer.nbytes() for layer in self.layers if isinstance(layer, GDNState))
        kv = sum(layer.nbytes() for layer in self.layers if isinstance(layer, KVCache))
        return {"recurrent": recurrent, "kv": kv, "total": recurrent + kv}

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished sequences): index [B'] into the batch."""
        for layer in self.layers:
            if isinstance(layer, GDNState):
                layer.conv_state = layer.conv_state.index_select(0, index)
                layer.recurrent_state = layer.recurrent_state.index_select(0, index)
            else:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        self.key_padding = self.key_padding.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
