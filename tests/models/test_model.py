"""Model behaviour: padding, packed documents, the decoding cache, bad input."""

from __future__ import annotations

import pytest
import torch

from hybridlm.models import HybridConfig, HybridLM, get_preset
from hybridlm.models.memory import decoding_memory

TOLERANCE = 1e-5


def _config(layer_pattern="GGAS", **overrides) -> HybridConfig:
    fields = dict(
        vocab_size=97,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        layer_pattern=layer_pattern,
        rope_theta=10000.0,
        sliding_window=5,
        gdn_key_heads=2,
        gdn_value_heads=4,
        gdn_key_head_dim=8,
        gdn_value_head_dim=12,
        pad_token_id=0,
        eos_token_id=1,
        max_seq_len=256,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


def _model(config: HybridConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(config).eval()
    with torch.no_grad():  # non-trivial norms and gates so every path matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    return float((a - b).abs().max() / b.abs().max()) <= tolerance


CONFIGS = {
    "hybrid-rope": _config(),
    "hybrid-nope": _config(rope_theta=None),
    "olmo3-like": _config("SSSA"),
    "pure-gdn": _config("G"),
    "deltanet-nogate": _config("GA", gdn_use_decay=False, gdn_use_output_gate=False, qk_norm="head"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = _model(CONFIGS[name])
    lengths = [11, 4, 8]
    prompts = [torch.randint(2, 97, (n,)) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        batched = model(input_ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None]).logits[0]
            assert _close(batched[row, width - len(prompt):], alone), (name, row)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_documents_equal_separate_documents(name):
    model = _model(CONFIGS[name], seed=1)
    docs = [torch.randint(2, 97, (n,)) for n in (7, 1, 13, 3)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        logits = model(packed, doc_ids=doc_ids).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            assert _close(logits[start : start + len(doc)], alone), name
            start += len(doc)


def test_packed_documents_across_batch_rows():
    model = _model(CONFIGS["hybrid-rope"], seed=2)
    input_ids = torch.randint(2, 97, (2, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    with torch.no_grad():
        logits = model(input_ids, doc_ids=doc_ids).logits
        assert _close(logits[0, :5], model(input_ids[:1, :5]).logits[0])
        assert _close(logits[0, 5:], model(input_ids[:1, 5:]).logits[0])
        assert _close(logits[1], model(input_ids[1:]).logits[0])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_incremental_decoding_equals_full_forward(name):
    model = _model(CONFIGS[name], seed=3)
    input_ids = torch.randint(2, 97, (2, 20))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = model.allocate_cache(2, 32)
        pieces = [model(input_ids[:, :9], cache=cache).logits]  # prefill
        for t in range(9, 14):  # one-token decode steps
            pieces.append(model(input_ids[:, t : t + 1], cache=cache).logits)
        pieces.append(model(input_ids[:, 14:], cache=cache).logits)  # multi-token continuation
    assert _close(torch.cat(pieces, dim=1), full), name


def test_padded_prefill_then_decode_equals_each_prompt_alone():
    model = _model(CONFIGS["hybrid-rope"], seed=4)
    prompts = [torch.randint(2, 97, (n,)) for n in (6, 3)]
    continuation = torch.randint(2, 97, (2, 4))
    input_ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, 6 - len(prompt):] = prompt
        mask[row, 6 - len(prompt):] = 1
    with torch.no_grad():
        cache = model.allocate_cache(2, 16)
        model(input_ids, attention_mask=mask, cache=cache)
        steps = [model(continuation[:, t : t + 1], cache=cache).logits for t in range(4)]
        decoded = torch.cat(steps, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None]).logits[0, len(prompt):]
            assert _close(decoded[row], alone)


def test_cache_bytes_match_the_formula():
    config = CONFIGS["hybrid-rope"]
    model = _model(config)
    cache = model.allocate_cache(3, 40, dtype=torch.bfloat16)
    memory = decoding_memory(config, 40, batch_size=3, dtype=torch.bfloat16)
    assert cache.nbytes() == {"recurrent": memory.recurrent_bytes, "kv": memory.kv_bytes, "total": memory.total_bytes}


def test_bad_input_is_rejected_clearly():
    model = _model(CONFIGS["hybrid-rope"])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_seq_len 256"):
        model(torch.ones(1, 257, dtype=torch.long))
    cache = model.allocate_cache(1, 4)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 3))


def test_training_step_gives_finite_gradients_everywhere():
    model = HybridLM(_config())
    input_ids = torch.randint(2, 97, (2, 70))
    logits = model(input_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), input_ids[:, 1:].reshape(-1))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_presets_build_and_run():
    model = HybridLM(get_preset("hybrid-tiny")).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 8192, (1, 9))).logits
    assert logits.shape == (1, 9, 8192) and torch.isfinite(logits).all()
