"""Where the chunks of a batch (or of packed documents) sit, computed on the device without a host sync.

Every sequence is cut into its own chunks of C = 64 tokens, starting at the sequence start; the last
one may be partial. The parallel kernels run one program per chunk *slot*; the sequential kernels run
one program per sequence and walk its chunks. Chunk-indexed buffers (the chunk-entry states) are laid
out by global chunk index `chunk_offsets[seq] + local`.

With packed documents the number of chunks is only known on the device, so the grid has an upper
bound of slots, floor(T / C) + N (each document adds at most one partial chunk), and the spare slots
carry sequence index -1: their programs return at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 64


@dataclass(frozen=True)
class SequenceLayout:
    """Device-side description of the sequences and their chunks.

    cu_seqlens: int32 [N+1] token offsets of the N sequences in the flattened token axis.
    chunk_offsets: int32 [N+1] global index of each sequence's first chunk.
    chunk_seq: int32 [num_slots] sequence of each chunk slot (-1: spare slot).
    chunk_local: int32 [num_slots] chunk index within its sequence.
    num_seqs: N. num_slots: grid size of the per-chunk kernels (>= the number of chunks).
    uniform_len: T for a batch of equal-length sequences (slot s is then chunk s % ceil(T / C) of
    sequence s // ceil(T / C), so the per-chunk kernels can compute where it sits instead of
    reading it), 0 for packed documents.
    """

    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_seq: torch.Tensor
    chunk_local: torch.Tensor
    num_seqs: int
    num_slots: int
    uniform_len: int = 0

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.cu_seqlens, self.chunk_offsets, self.chunk_seq, self.chunk_local


# Layouts of equal-length batches, by (batch, seq_len, device): building one costs five small device
# operations and about 0.1 ms of host time, against about 0.7 ms of GPU time for a whole forward at
# the 7B layer, so rebuilding it on every call can leave the GPU waiting for the host. Not while a
# CUDA graph is being captured: the captured operations have not run yet.
_UNIFORM: dict[tuple[int, int, torch.device], SequenceLayout] = {}


def sequence_layout(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> SequenceLayout:
    """The chunk layout of B sequences of length T, or of the packed documents in cu_seqlens (B == 1)."""
    if cu_seqlens is None:
        key = (batch, seq_len, torch.device(device))
        layout = _UNIFORM.get(key)
        if layout is None or (key[2].type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if len(_UNIFORM) >= 64:
                _UNIFORM.clear()
            chunks = (seq_len + CHUNK - 1) // CHUNK
            num_slots = batch * chunks
            slots = torch.arange(num_slots, device=device, dtype=torch.int32)
            layout = SequenceLayout(
                cu_seqlens=torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len,
                chunk_offsets=torch.arange(batch + 1, device=device, dtype=torch.int32) * chunks,
                chunk_seq=slots // chunks,
                chunk_local=slots % chunks,
                num_seqs=batch,
                num_slots=num_slots,
                uniform_len=seq_len,
            )
            if not (key[2].type == "cuda" and torch.cuda.is_current_stream_capturing()):
                _UNIFORM[key] = layout
        return layout
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    num_seqs = cu.numel() - 1
    chunks = (cu[1:] - cu[:-1] + CHUNK - 1) // CHUNK
    chunk_offsets = torch.cat([cu.new_zeros(1), chunks.cumsum(0, dtype=torch.int32)])
    num_slots = seq_len // CHUNK + num_seqs
    slots = torch.arange(num_slots, device=device, dtype=torch.int32)
    seq = torch.searchsorted(chunk_offsets[1:], slots, right=True).to(torch.int32)
    valid = slots < chunk_offsets[-1]
    seq = torch.where(valid, seq, -1)
    local = slots - chunk_offsets[seq.clamp(min=0).long()]
    return SequenceLayout(cu, chunk_offsets, seq, local, num_seqs, num_slots)
