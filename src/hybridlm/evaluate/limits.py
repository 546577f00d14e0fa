"""Checks made before an evaluation starts: is the length allowed, and will it fit in memory?

Both raise ValueError with the numbers and what to change, so that a length the model or the
machine cannot take is refused before minutes of tokenizing and prefilling, not after.

The memory estimate is deliberately rough and pessimistic: it counts the largest transient
tensors of one forward pass (attention scores materialised by the masked SDPA path, the logits
chunk, the MLP activations) plus the weights and, for generation, the decoding cache.
"""

from __future__ import annotations

import os

import torch

from hybridlm.models.config import HybridConfig
from hybridlm.models.memory import decoding_memory, human_bytes

# Loss evaluation projects hidden states to logits this many positions at a time.
LOGITS_CHUNK = 1024
# Refuse when the estimate exceeds this fraction of the free memory (the rest is other processes' slack).
MEMORY_FRACTION = 0.8


def check_length(config: HybridConfig, length: int, *, what: str = "length") -> None:
    """Refuse a sequence length the model's config does not allow (max_seq_len)."""
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"{what} must be an integer >= 2 (got {length!r})")
    if length > config.max_seq_len:
        raise ValueError(
            f"{what} {length} exceeds the model's max_seq_len {config.max_seq_len}. Evaluate at most "
            f"{config.max_seq_len} tokens, or raise the limit with --max-seq-len {length} (the model runs at any "
            "length; beyond its training length the numbers measure extrapolation)"
        )


def available_memory(device: torch.device | str) -> int:
    """Free bytes on `device`: CUDA's free memory, or the host's MemAvailable for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def forward_bytes(config: HybridConfig, batch: int, query_length: int, key_length: int, *, logits_positions: int,
                  dtype: torch.dtype = torch.float32) -> int:
    """Peak transient bytes of one no-grad forward of `batch` x `query_length` new tokens attending to
    `key_length` keys, with logits for `logits_positions` positions per row."""
    element = torch.empty((), dtype=dtype).element_size()
    scores = 0
    if config.has_attention:
        # Masked SDPA on the math path holds the scores and their softmax: [B, H, Tq, Tk] float32, twice.
        scores = 2 * batch * config.n_heads * query_length * key_length * 4
    widest = max(config.d_model, config.mlp_hidden * 2, config.gdn_key_dim * 2 + config.gdn_value_dim * 2
                 if config.has_gdn else 0)
    activations = 6 * batch * query_length * widest * element
    logits = 2 * batch * logits_positions * config.vocab_size * 4  # float32 logits and their log-softmax
    return scores + activations + logits


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_memory(needed: int, device: torch.device | str, *, what: str, hint: str) -> None:
    """Refuse when `needed` bytes exceed MEMORY_FRACTION of the free memory of `device`."""
    free = available_memory(device)
    if needed > MEMORY_FRACTION * free:
        raise ValueError(
            f"{what} needs about {human_bytes(needed)} but only {human_bytes(free)} is free on {device}: {hint}"
        )


def loss_memory(config: HybridConfig, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
    """Transient bytes of `evaluate_loss` at one batch (logits are projected LOGITS_CHUNK positions at a time)."""
    return forward_bytes(config, batch, seq_len, seq_len, logits_positions=min(seq_len, LOGITS_CHUNK), dtype=dtype)


def generation_memory(config: HybridConfig, batch: int, length: int, *, prefill_chunk_tokens: int,
                      dtype: torch.dtype = torch.float32) -> int:
    """Bytes of generating up to `length` tokens for `batch` prompts: the decoding cache plus the peak of
    the chunked prefill (each chunk of prefill_chunk_tokens / batch positions attends to all keys so far)."""
    chunk = max(1, min(length, prefill_chunk_tokens // batch))
    cache = decoding_memory(config, length, batch_size=batch, dtype=dtype).total_bytes
    return cache + forward_bytes(config, batch, chunk, length, logits_positions=1, dtype=dtype)
