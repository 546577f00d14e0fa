"""The generation engine: batching with left padding, stop tokens, sampling options, bad input."""

from __future__ import annotations

import pytest
import torch

from hybridlm.generate import Generator
from hybridlm.models.memory import decoding_memory

VOCAB = 97  # the tiny models' vocabulary (conftest.tiny_config)


def _naive_greedy(model, prompt: list[int], max_new_tokens: int, stops=(1,)) -> list[int]:
    """Recompute the whole sequence for every new token: no cache, no padding, no engine."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token in stops:
                break
    return tokens[len(prompt) :]


def _prompts(lengths, seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["hybrid-rope", "hybrid-nope", "olmo3-like", "pure-gdn", "deltanet-nogate"])
def test_batch_of_different_lengths_equals_each_prompt_alone_and_the_naive_loop(name, make_model):
    model = make_model(name, seed=5)
    prompts = _prompts([9, 2, 14, 5], seed=6)
    batched = model.generate(prompts, max_new_tokens=12, stop_token_ids=())
    for prompt, tokens in zip(prompts, batched):
        assert model.generate([prompt], max_new_tokens=12, stop_token_ids=()) == [tokens]
        assert tokens == _naive_greedy(model, prompt, 12, stops=())


def test_tensor_input_with_attention_mask_equals_list_input(make_model):
    model = make_model(seed=7)
    prompts = _prompts([6, 3], seed=8)
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    assert model.generate(ids, mask, max_new_tokens=6) == model.generate(prompts, max_new_tokens=6)
    assert model.generate(torch.tensor(prompts[0]), max_new_tokens=4) == model.generate(prompts[:1], max_new_tokens=4)


def test_stop_tokens_end_each_sequence_independently(make_model):
    model = make_model(seed=9)
    prompts = _prompts([4, 7, 2], seed=10)
    free = model.generate(prompts, max_new_tokens=10, stop_token_ids=())
    # Stop on the token each row emits at step 3 (and on nothing earlier in that row).
    stops = []
    for row in free:
        stops.append(next(t for t in row[3:] if t not in row[:3] and t not in stops))
    stopped = model.generate(prompts, max_new_tokens=10, stop_token_ids=stops)
    for row, out in zip(free, stopped):
        first_stop = next(i for i, t in enumerate(row) if t in stops)
        assert out == row[: first_stop + 1]
    # A stop token on every row ends generation early; outputs keep it as their last token.
    assert all(out[-1] in stops for out in stopped)


def test_default_stop_token_is_eos_and_is_kept(make_model):
    model = make_model(seed=11)
    prompt = _prompts([5], seed=12)[0]
    free = model.generate([prompt], max_new_tokens=8, stop_token_ids=())[0]
    eos_model = make_model(seed=11)
    eos_model.config = eos_model.config.replace(eos_token_id=free[2])
    out = eos_model.generate([prompt], max_new_tokens=8)[0]
    assert out == free[: free.index(free[2]) + 1]


def test_sampling_is_seeded_and_respects_top_k_and_top_p(make_model):
    model = make_model(seed=13)
    prompts = _prompts([5, 3], seed=14)
    a = model.generate(prompts, max_new_tokens=10, temperature=1.0, seed=123, stop_token_ids=())
    b = model.generate(prompts, max_new_tokens=10, temperature=1.0, seed=123, stop_token_ids=())
    c = model.generate(prompts, max_new_tokens=10, temperature=1.0, seed=124, stop_token_ids=())
    assert a == b and a != c
    greedy = model.generate(prompts, max_new_tokens=10, stop_token_ids=())
    assert model.generate(prompts, max_new_tokens=10, temperature=2.0, top_k=1, seed=1, stop_token_ids=()) == greedy
    assert model.generate(prompts, max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=1, stop_token_ids=()) == greedy


def test_generator_is_reusable_and_pads_the_batch_with_filler_rows(make_model):
    model = make_model(seed=15)
    prompts = _prompts([3, 8, 5], seed=16)
    engine = Generator(model, batch_size=4, max_length=20)
    first = engine.generate(prompts, max_new_tokens=9)
    assert engine.generate(prompts[:1], max_new_tokens=9) == first[:1]
    assert engine.generate(prompts, max_new_tokens=9) == first
    assert first == model.generate(prompts, max_new_tokens=9)
    with pytest.raises(ValueError, match="at most 4"):
        engine.generate(prompts * 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_length 20"):
        engine.generate(prompts, max_new_tokens=13)


def test_streamer_sees_every_token_and_stats_report_the_allocated_cache(make_model):
    model = make_model(seed=17)
    prompts = _prompts([4, 6], seed=18)
    seen = []
    output = model.generate(prompts, max_new_tokens=7, streamer=seen.append, return_stats=True, stop_token_ids=())
    assert [[step[row] for step in seen] for row in range(2)] == output.sequences
    stats = output.stats
    assert stats.generated_tokens == 14 and stats.decode_steps == 6 and stats.prompt_tokens == 10
    memory = decoding_memory(model.config, 6 + 7, batch_size=2, dtype=torch.float32)
    assert stats.cache_bytes == {"recurrent": memory.recurrent_bytes, "kv": memory.kv_bytes, "total": memory.total_bytes}
    assert "cache" in stats.summary()


def test_prefill_in_chunks_equals_one_prefill(make_model):
    model = make_model(seed=19)
    prompts = _prompts([13, 4, 9], seed=20)
    whole = model.generate(prompts, max_new_tokens=6, prefill_chunk_tokens=None)
    assert model.generate(prompts, max_new_tokens=6, prefill_chunk_tokens=3 * 4) == whole  # chunks of 4
    assert model.generate(prompts, max_new_tokens=6, prefill_chunk_tokens=1) == whole  # one token at a time


def test_bad_input_is_rejected_clearly(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt in rows \\[1\\]"):
        model.generate(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="no prompts"):
        model.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"at most max_seq_len=128"):
        model.generate([[5] * 129], max_new_tokens=1)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 28"):
        model.generate([[5] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\).*\[97, 200\]"):
        model.generate([[5, 97, 200]], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\).*\[-1\]"):
        model.generate([[-1, 5]], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        model.generate([[5]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[5]], temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[5]], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        model.generate([[5]], stop_token_ids=[97])
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        model.generate([[5]], use_cuda_graph=True)
    assert model.generate([[5], [6, 7]], max_new_tokens=0) == [[], []]
