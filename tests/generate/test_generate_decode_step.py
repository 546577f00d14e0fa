"""The static-shape decode step (what a CUDA graph replays) equals the dynamic forward."""

from __future__ import annotations

import pytest
import torch

from hybridlm.models.memory import decoding_memory
from hybridlm.nn.attention import KVCache

TOLERANCE = 1e-5
VOCAB = 97  # the tiny models' vocabulary (conftest.tiny_config)
CONFIG_NAMES = ["deltanet-nogate", "hybrid-nope", "hybrid-rope", "olmo3-like", "pure-gdn"]  # conftest.CONFIGS


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [(7, 3, 11), (2, 1)])
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_static_decode_after_padded_prefill_equals_full_forward_alone(name, lengths, make_model):
    """Prefill a left-padded batch, decode 9 tokens with decode_step (past the window of 5; from
    prompts longer or shorter than it), then compare every step's logits with a full forward of
    each prompt + continuation alone."""
    model = make_model(name, seed=1)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, VOCAB, (n,), generator=generator) for n in lengths]
    continuation = torch.randint(2, VOCAB, (len(lengths), 9), generator=generator)
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        cache = model.allocate_cache(len(lengths), 24)
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        steps = [model.decode_step(continuation[:, t : t + 1], cache) for t in range(continuation.shape[1])]
        decoded = torch.stack(steps, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None]).logits[0, len(prompt) :]
            assert _relative(decoded[row], alone) <= TOLERANCE, (name, row)
    assert cache.length == ids.shape[1] + continuation.shape[1]


@pytest.mark.parametrize("name", ["hybrid-rope", "olmo3-like"])
def test_static_steps_then_multi_token_continuation_equals_token_by_token(name, make_model):
    """decode_step advances only the device-side index; a later multi-token forward must continue
    from the right position (and ring buffer slot), and equal feeding the same tokens one by one."""
    model = make_model(name, seed=3)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(2, VOCAB, (2, 30), generator=generator)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2, 32)
        pieces = [model(ids[:, :6], cache=cache).logits]
        pieces += [model.decode_step(ids[:, t : t + 1], cache)[:, None] for t in range(6, 13)]
        pieces.append(model(ids[:, 13:22], cache=cache).logits)  # multi-token continuation, wraps the ring
        pieces += [model.decode_step(ids[:, t : t + 1], cache)[:, None] for t in range(22, 26)]
        pieces += [model(ids[:, t : t + 1], cache=cache).logits for t in range(26, 30)]  # dynamic one-token steps
    assert _relative(torch.cat(pieces, dim=1), full) <= TOLERANCE


def test_sliding_window_layers_use_a_ring_buffer_that_memory_accounting_matches(make_model):
    model = make_model("olmo3-like")
    config = model.config
    for max_length in (3, 5, 40):
        cache = model.allocate_cache(2, max_length, dtype=torch.bfloat16)
        capacities = [layer.capacity for layer in cache.layers if isinstance(layer, KVCache)]
        assert capacities == [min(max_length, 5)] * 3 + [max_length]
        memory = decoding_memory(config, max_length, batch_size=2, dtype=torch.bfloat16)
        assert cache.nbytes() == {"recurrent": memory.recurrent_bytes, "kv": memory.kv_bytes, "total": memory.total_bytes}


def test_reset_empties_the_cache_in_place(make_model):
    model = make_model("hybrid-rope")
    cache = model.allocate_cache(2, 16)
    buffers = [t.data_ptr() for t in (cache.key_padding, cache.positions, cache.next_index)]
    ids = torch.randint(2, VOCAB, (2, 5))
    with torch.no_grad():
        first = model(ids, cache=cache).logits
        model.decode_step(ids[:, :1], cache)
        cache.reset()
        assert cache.length == 0 and not cache.key_padding.any() and not cache.positions.any()
        again = model(ids, cache=cache).logits
    assert torch.equal(first, again)
    assert buffers == [t.data_ptr() for t in (cache.key_padding, cache.positions, cache.next_index)]
