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
    key_padding: [B, max_length] bool, True where a real (non-padding) token was written (indexed by
        position; ring-buffer layers map positions to slots themselves).
    positions: [B] int64, the number of real tokens seen per sequence (the next RoPE position).
    next_index: [1] int64 on the cache's device, the next position to write (= `length`). It lives on
        the device so a CUDA-graph decode step can advance it without the host.
    """

    layers: list[GDNState | KVCache]
    key_padding: torch.Tensor
    positions: torch.Tensor
    next_index: torch.Tensor

    @property
    def length(self) -> int:
        """How many positions (padding included) have been written. Reads the device-side `next_index`
        (a host sync), which both `HybridLM.forward` and the static `HybridLM.decode_step` advance."""
        return int(self.next_index)

    def begin_write(self, count: int) -> int:
        """Claim the next `count` positions for a forward pass; returns the first one.

        Sets every KV cache's host-side length to it (decode steps replayed from a CUDA graph advance
        only the device-side index), then advances the index.
        """
        start = self.length
        if start + count > self.capacity:
            raise ValueError(
                f"the cache holds {self.capacity} positions; {start} used and {count} more requested"
            )
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.length = start
        self.next_index.fill_(start + count)
        return start

    @property
    def capacity(self) -> int:
        return self.key_padding.shape[1]

    @property
    def batch_size(self) -> int:
        return self.key_padding.shape[0]

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses, so captured CUDA graphs stay valid)."""
        for layer in self.layers:
            if isinstance(layer, GDNState):
                layer.conv_state.zero_()
                layer.recurrent_state.zero_()
            else:
                layer.keys.zero_()
                layer.values.zero_()
                layer.length = 0
        self.key_padding.zero_()
        self.positions.zero_()
        self.next_index.zero_()

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
