"""Parameter groups, schedules, the skip-step guard and the loss."""

import math

import pytest
import torch

from hybridlm.models import HybridLM, get_preset
from hybridlm.train.config import OptimizerSection, ScheduleSection
from hybridlm.train.loss import IGNORE_INDEX, language_model_loss_sums
from hybridlm.train.optim import SkipStepGuard, build_optimizer, lr_at, parameter_groups


def test_no_weight_decay_on_norms_embeddings_and_gdn_gates():
    model = HybridLM(get_preset("hybrid-tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in not_decayed
    assert "lm_head.weight" in decayed
    assert "model.layers.0.linear_attn.A_log" in not_decayed
    assert "model.layers.0.linear_attn.dt_bias" in not_decayed
    assert "model.layers.0.input_layernorm.weight" in not_decayed
    assert "model.layers.0.linear_attn.o_norm.weight" in not_decayed
    assert "model.layers.3.self_attn.q_norm.weight" in not_decayed
    assert "model.layers.0.linear_attn.q_conv1d.weight" in decayed
    assert "model.layers.3.self_attn.q_proj.weight" in decayed
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    optimizer = build_optimizer(model, OptimizerSection(lr=1e-3, betas=(0.9, 0.95)))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_tied_head_is_counted_once_and_not_decayed():
    model = HybridLM(get_preset("hybrid-tiny", tie_embeddings=True))
    decay, no_decay = parameter_groups(model, 0.1)
    all_params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in all_params}) == len(all_params)
    assert any(p is model.model.embed_tokens.weight for p in no_decay["params"])


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_schedule_warmup_peak_and_floor(name):
    schedule = ScheduleSection(name=name, warmup_steps=10, final_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_at(step, 1.0, 100, schedule) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # step 0 already trains: peak / warmup
    assert lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert max(lrs) == pytest.approx(1.0)
    after = lrs[10:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:])), "must not rise after warmup"
    if name == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] == pytest.approx(0.1)
    if name == "wsd":
        assert lrs[79] == pytest.approx(1.0) and lrs[80] < 1.0  # decay over the last 20 steps
    if name == "cosine":
        middle = 10 + (99 - 10) / 2
        assert lr_at(int(middle), 1.0, 100, schedule) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(middle) - 10) / 89)))


def test_schedule_without_warmup_starts_at_peak():
    schedule = ScheduleSection(name="cosine", warmup_steps=0, final_lr_ratio=0.0)
    assert lr_at(0, 3e-4, 10, schedule) == pytest.approx(3e-4)
    assert lr_at(9, 3e-4, 10, schedule) == pytest.approx(0.0, abs=1e-12)


def test_skip_guard_non_finite_and_spikes():
    guard = SkipStepGuard(sigma=6.0, window=8, min_history=4)
    assert guard.check(float("nan"), 1.0) is not None
    assert guard.check(1.0, float("inf")) is not None
    # Without history a large value is applied.
    for loss in (3.0, 3.1, 2.9, 3.0):
        assert guard.check(loss, 1.0 + loss / 100) is None
    reason = guard.check(30.0, 1.03)
    assert reason is not None and "loss" in reason
    reason = guard.check(3.0, 500.0)
    assert reason is not None and "gradient norm" in reason
    assert len(guard.losses) == 4, "skipped steps stay out of the history"
    assert guard.check(3.05, 1.03) is None
    restored = SkipStepGuard(sigma=6.0, window=8, min_history=4)
    restored.load_state_dict(guard.state_dict())
    assert list(restored.losses) == list(guard.losses) and restored.check(30.0, 1.0) is not None


def test_skip_guard_disabled_still_skips_non_finite():
    guard = SkipStepGuard(window=4, min_history=2, enabled=False)
    for _ in range(3):
        assert guard.check(1.0, 1.0) is None
    assert guard.check(1e9, 1.0) is None
    assert guard.check(float("nan"), 1.0) is not None


def test_loss_sums_match_cross_entropy_and_z_loss_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = IGNORE_INDEX
    sums = language_model_loss_sums(logits.to(torch.bfloat16), labels)
    assert sums.cross_entropy.dtype == torch.float32 and sums.count == 9
    keep = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.to(torch.bfloat16).double(), -1)
    expected = -log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum()
    assert sums.cross_entropy.item() == pytest.approx(expected.item(), rel=1e-5)
    lse = torch.logsumexp(logits.to(torch.bfloat16).double(), -1)[keep]
    assert sums.z_loss.item() == pytest.approx(lse.pow(2).sum().item(), rel=1e-5)


def test_model_loss_sums_match_the_loss_of_the_logits():
    # The fused LM-head loss inside the model (what training uses) against the logits path: same
    # sums and same gradients for every parameter, packed documents and ignored labels included.
    from hybridlm.models import HybridLM, get_preset
    from hybridlm.train.loss import model_loss_sums

    torch.manual_seed(0)
    model = HybridLM(get_preset("hybrid-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = torch.randint(0, model.config.vocab_size, (2, 40))
    labels[0, :7] = IGNORE_INDEX
    doc_ids = torch.cat([torch.zeros(2, 25, dtype=torch.long), torch.ones(2, 15, dtype=torch.long)], 1)

    def loss_and_grads(sums):
        loss = sums.cross_entropy + 0.3 * sums.z_loss
        return [sums.cross_entropy.detach(), sums.z_loss.detach()], torch.autograd.grad(loss, list(model.parameters()))

    fused, fused_grads = loss_and_grads(model_loss_sums(model, ids, labels, doc_ids=doc_ids))
    reference = language_model_loss_sums(model(ids, doc_ids=doc_ids).logits, labels)
    expected, expected_grads = loss_and_grads(reference)
    assert reference.count == 73
    for got, want in zip(fused + list(fused_grads), expected + list(expected_grads)):
        # float32 rounding apart (both paths compute the loss in float32, in different orders)
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-9
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(ids, labels=labels[:, :-1])
