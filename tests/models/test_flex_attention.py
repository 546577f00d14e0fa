"""Flex attention (a BlockMask) applies documents and sliding windows exactly as the dense mask does."""

import pytest
import torch

import hybridlm.nn.attention as attention
from hybridlm.models import HybridLM, get_preset
from hybridlm.train.config import ConfigError, TrainConfig


def _count_flex_calls(monkeypatch) -> list:
    calls = []
    original = attention.flex_attention_fn

    def counting(cuda):
        calls.append(cuda)
        return original(cuda)

    monkeypatch.setattr(attention, "flex_attention_fn", counting)
    return calls


@pytest.mark.parametrize("preset", ["olmo3-tiny", "hybrid-tiny"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_flex_matches_dense_mask(monkeypatch, preset, packed):
    torch.manual_seed(0)
    config = get_preset(preset, sliding_window=24)
    model = HybridLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (2, 150))
    doc_ids = None
    if packed:  # documents of 1, 40, 69 and 40 tokens in row 0; row 1 has one boundary at 100
        doc_ids = torch.zeros(2, 150, dtype=torch.long)
        doc_ids[0, 1:] += 1
        doc_ids[0, 41:] += 1
        doc_ids[0, 110:] += 1
        doc_ids[1, 100:] = 1
    calls = _count_flex_calls(monkeypatch)
    with torch.no_grad():  # flex attention has no backward on CPU
        dense = model(ids, doc_ids=doc_ids, attn_impl="sdpa").logits
        model(ids, doc_ids=doc_ids)  # auto: the dense mask off the GPU
        assert calls == []
        flex = model(ids, doc_ids=doc_ids, attn_impl="flex").logits
    # A block mask is built only where a plain causal call would not do.
    masked_layers = sum(kind == "swa" or (kind == "attn" and packed) for kind in config.layer_kinds)
    assert len(calls) == masked_layers
    assert (flex - dense).abs().max().item() < 1e-10
    # The masks matter: without the documents the logits differ.
    if packed:
        with torch.no_grad():
            unmasked = model(ids, attn_impl="flex").logits
        assert (unmasked - dense).abs().max().item() > 1e-3


def test_block_mask_matches_dense_mask_on_raw_attention():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 300, 16, dtype=torch.float64) for _ in range(3))
    doc_ids = torch.tensor([[0] * 5 + [1] * 200 + [2] * 95, [0] * 300])
    cpu = torch.device("cpu")
    block = attention.build_block_mask(batch=2, seq_len=300, doc_ids=doc_ids, sliding_window=130, device=cpu)
    dense = attention.build_attention_mask(query_length=300, key_length=300, doc_ids=doc_ids, sliding_window=130, device=cpu)
    got = attention.flex_attention_fn(False)(q, k, v, block_mask=block)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert (got - want).abs().max().item() < 1e-12


def test_attn_impl_is_checked():
    model = HybridLM(get_preset("olmo3-tiny"))
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        model(torch.zeros(1, 8, dtype=torch.long), attn_impl="flash")
    with pytest.raises(ConfigError, match="trainer.attn_impl must be one of"):
        TrainConfig.from_dict({"trainer": {"attn_impl": "flash"}}).validate()
