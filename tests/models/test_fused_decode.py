"""The fused decode path (`decode_step(fused=True)`, derived inference weights) equals the reference
blocks and a full forward; the derived weights stay out of training and checkpoints and follow the
parameters. The Triton wiring runs on CPU through Triton's interpreter. Budget: ~30 s on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined (as tests/ops do)

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridlm.generate import Generator  # noqa: E402
from hybridlm.models import HybridConfig, HybridLM  # noqa: E402
from hybridlm.nn.inference import apply_rotary_fused, rms_norm_fused, rotary_sign  # noqa: E402
from hybridlm.nn.rope import apply_rotary  # noqa: E402
from hybridlm.ops.norm import rms_norm  # noqa: E402

TOLERANCE = 1e-5
VOCAB = 97


def _config(layer_pattern: str = "GGAS", **overrides) -> HybridConfig:
    fields = dict(
        vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden=48,
        layer_pattern=layer_pattern, rope_theta=10000.0, sliding_window=5, gdn_key_heads=2,
        gdn_value_heads=4, gdn_key_head_dim=8, gdn_value_head_dim=12, pad_token_id=0, eos_token_id=1,
        max_seq_len=128,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


CONFIGS = {
    "hybrid-rope": _config(),
    "hybrid-nope": _config(rope_theta=None),
    "hybrid-yarn": _config(
        "GGSA", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    ),
    "olmo3-like": _config("SSSA"),
    "pure-gdn": _config("G", gdn_neg_eigval=False),
    "deltanet-nogate": _config("GA", gdn_use_decay=False, gdn_use_output_gate=False, qk_norm="head"),
    "no-qk-norm": _config("GA", qk_norm="none", n_kv_heads=4),
}


def _model(name: str, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(CONFIGS[name]).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.1 * torch.randn_like(param))
            elif param_name.endswith("weight") and "embed" not in param_name:
                param.mul_(3.0)  # sharper logits
    return model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _left_padded_batch(generator: torch.Generator, lengths: tuple[int, ...]) -> tuple[list, torch.Tensor, torch.Tensor]:
    prompts = [torch.randint(2, VOCAB, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return prompts, ids, mask


def _decode(model: HybridLM, ids, mask, continuation, *, fused: bool, gdn_impl: str = "auto") -> torch.Tensor:
    """Prefill (left-padded), then one decode_step per continuation token: logits [B, steps, vocab]."""
    with torch.no_grad():
        cache = model.allocate_cache(ids.shape[0], ids.shape[1] + continuation.shape[1])
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        steps = [
            model.decode_step(continuation[:, t : t + 1], cache, fused=fused, gdn_impl=gdn_impl)
            for t in range(continuation.shape[1])
        ]
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_decode_equals_reference_blocks_and_full_forward(name):
    """Left-padded prompts longer and shorter than the window of 5, then 8 steps (ring buffers wrap)."""
    model = _model(name, seed=1)
    generator = torch.Generator().manual_seed(2)
    prompts, ids, mask = _left_padded_batch(generator, (7, 3, 1))
    continuation = torch.randint(2, VOCAB, (3, 8), generator=generator)
    fused = _decode(model, ids, mask, continuation, fused=True)
    reference = _decode(model, ids, mask, continuation, fused=False)
    assert _relative(fused, reference) <= TOLERANCE
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, continuation[row]])[None]).logits[0, len(prompt) :]
            assert _relative(fused[row], alone) <= TOLERANCE, row


@pytest.mark.parametrize("name", ["hybrid-rope", "deltanet-nogate"])
def test_fused_decode_with_triton_kernels_equals_reference(name):
    """gdn_impl="triton": the in-place conv and recurrent kernels (Triton's interpreter on CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    model = _model(name, seed=5)
    generator = torch.Generator().manual_seed(6)
    _, ids, mask = _left_padded_batch(generator, (6, 2))
    continuation = torch.randint(2, VOCAB, (2, 4), generator=generator)
    fused = _decode(model, ids, mask, continuation, fused=True, gdn_impl="triton")
    reference = _decode(model, ids, mask, continuation, fused=False)
    assert _relative(fused, reference) <= TOLERANCE


def test_fused_decode_in_bfloat16_matches_the_reference_blocks():
    model = _model("hybrid-rope", seed=7).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(8)
    _, ids, mask = _left_padded_batch(generator, (5, 2))
    continuation = torch.randint(2, VOCAB, (2, 4), generator=generator)
    fused = _decode(model, ids, mask, continuation, fused=True).float()
    reference = _decode(model, ids, mask, continuation, fused=False).float()
    assert _relative(fused, reference) <= 1e-2


def test_fused_helpers_equal_the_reference_ops():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 4, 16, generator=generator)
    weight = torch.randn(16, generator=generator)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):  # float64: computed in float32 by both
        fused = rms_norm_fused(x.to(dtype), weight.to(dtype), 1e-6)
        assert fused.dtype == dtype and torch.equal(fused, rms_norm(x.to(dtype), weight.to(dtype), 1e-6))
    cos, sin = torch.randn(2, 3, 2, 16, generator=generator).unbind(0)
    signed_sin = sin * rotary_sign(16, device="cpu")
    assert _relative(apply_rotary_fused(x, cos, signed_sin), apply_rotary(x, cos, sin)) <= 1e-6


def test_derived_weights_stay_out_of_parameters_buffers_and_checkpoints():
    model = _model("hybrid-rope")
    names = set(model.state_dict())
    buffers = [name for name, _ in model.named_buffers()]
    parameters = [name for name, _ in model.named_parameters()]
    assert model.prepare_for_inference() is True
    assert set(model.state_dict()) == names
    assert [name for name, _ in model.named_buffers()] == buffers
    assert [name for name, _ in model.named_parameters()] == parameters
    fresh = _model("hybrid-rope", seed=11)
    fresh.load_state_dict(model.state_dict())  # strict: same names, nothing extra


def test_derived_weights_follow_parameter_changes():
    """An in-place change (optimizer step, load_state_dict) rebuilds them; refreshing keeps addresses."""
    model = _model("hybrid-rope", seed=12)
    other = _model("hybrid-rope", seed=13)
    generator = torch.Generator().manual_seed(14)
    _, ids, mask = _left_padded_batch(generator, (4, 4))
    continuation = torch.randint(2, VOCAB, (2, 3), generator=generator)
    assert model.prepare_for_inference() is True
    mixer = model.model.layers[0].linear_attn
    address = mixer.inference_weights()["qkv_proj"].data_ptr()
    assert model.prepare_for_inference() is False  # refilled in place
    assert mixer.inference_weights()["qkv_proj"].data_ptr() == address

    model.load_state_dict(other.state_dict())
    reloaded = _decode(model, ids, mask, continuation, fused=True)
    assert _relative(reloaded, _decode(other, ids, mask, continuation, fused=False)) <= TOLERANCE
    assert mixer.inference_weights()["qkv_proj"].data_ptr() == address

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(ids).logits.square().mean()
    loss.backward()
    optimizer.step()
    assert _relative(
        _decode(model, ids, mask, continuation, fused=True), _decode(model, ids, mask, continuation, fused=False)
    ) <= TOLERANCE

    model.double()  # a new dtype: reallocated
    assert model.prepare_for_inference() is True
    assert mixer.inference_weights()["qkv_proj"].dtype == torch.float64


def test_prepared_prefill_equals_unprepared_and_training_ignores_derived_weights():
    model = _model("hybrid-rope", seed=15)
    ids = torch.randint(2, VOCAB, (2, 9))
    with torch.no_grad():
        plain = model(ids).logits
        model.prepare_for_inference()
        prepared = model(ids).logits
    assert _relative(prepared, plain) <= TOLERANCE
    model.train()
    model(ids).logits.square().mean().backward()  # grad enabled: the parameters themselves are used
    assert model.model.layers[0].linear_attn.q_proj.weight.grad is not None
    assert model.model.layers[0].linear_attn.q_conv1d.weight.grad is not None
    model.release_inference_weights()
    assert model.model.layers[0].linear_attn.prepared_inference_weights() is None


def test_fused_decode_needs_no_grad():
    model = _model("pure-gdn")
    cache = model.allocate_cache(1, 4)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="no_grad"):
        model.decode_step(torch.tensor([[5]]), cache)


def test_generator_fused_and_reference_agree_and_follow_weight_changes():
    model = _model("hybrid-rope", seed=16)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    fused = Generator(model, 2, 16)
    reference = Generator(model, 2, 16, fused=False)
    first = fused.generate(prompts, max_new_tokens=8, stop_token_ids=())
    assert first == reference.generate(prompts, max_new_tokens=8, stop_token_ids=())
    with torch.no_grad():  # change the weights behind the generator's back (through .data too)
        for param in model.parameters():
            param.data.mul_(-1.0)
    again = fused.generate(prompts, max_new_tokens=8, stop_token_ids=())
    assert again == reference.generate(prompts, max_new_tokens=8, stop_token_ids=())
    assert again != first
