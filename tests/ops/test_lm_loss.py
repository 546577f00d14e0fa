"""The fused LM loss (hybridlm.ops.lm_loss) against a float64 reference and the unfused training loss.

Both row-pass implementations run: "torch" and "triton" (on CPU tensors under TRITON_INTERPRET=1).
Small pieces (BLOCK_V, and the PyTorch row chunks) make every size here span several pieces with a
partial last one. Budget: a few seconds on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import hybridlm.ops.triton.lm_loss as triton_lm_loss  # noqa: E402
from hybridlm.ops import lm_loss  # noqa: E402
from hybridlm.ops.lm_loss import fused_lm_loss_sums  # noqa: E402
from hybridlm.train.loss import language_model_loss_sums  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)

IMPLS = ["torch", "triton"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(triton_lm_loss, "BLOCK_V", 256)
    monkeypatch.setattr(lm_loss, "TORCH_CHUNK_ELEMENTS", 16 * 300)  # 16 rows at V=300, one row at V=5000


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _problem(leading_shape, dim, vocab_size, *, max_logit=None, ignore_index=-100, seed=0):
    """float32 hidden [*leading_shape, dim], weight [V, dim]; int64 labels with every 5th row ignored,
    the first kept rows at labels 0 and V-1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*leading_shape, dim, generator=gen)
    weight = torch.randn(vocab_size, dim, generator=gen) / dim**0.5
    if max_logit is not None:
        hidden *= max_logit / (hidden @ weight.T).abs().max()
    labels = torch.randint(0, vocab_size, leading_shape, generator=gen)
    flat = labels.view(-1)
    flat[1], flat[2] = 0, vocab_size - 1
    flat[::5] = ignore_index
    return hidden, weight, labels


def _reference_sums(hidden, weight, labels, ignore_index=-100):
    """float64: (cross-entropy sum, z-loss sum) over the rows whose label is not ignore_index."""
    logits = (hidden.double() @ weight.double().T).reshape(-1, weight.shape[0])
    labels = labels.reshape(-1)
    cross_entropy = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    z_loss = (torch.logsumexp(logits, -1).square() * (labels != ignore_index)).sum()
    return cross_entropy, z_loss


def _sums_and_grads(loss_fn, hidden, weight, labels, coefficients=(0.7, -0.3)):
    """loss_fn(hidden, weight, labels) -> (ce, z); returns ce, z and the grads of a*ce + b*z."""
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    cross_entropy, z_loss = loss_fn(hidden, weight, labels)
    loss = coefficients[0] * cross_entropy + coefficients[1] * z_loss
    grads = torch.autograd.grad(loss, [hidden, weight])
    return cross_entropy.detach(), z_loss.detach(), grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "leading_shape, dim, vocab_size, max_logit, ignore_index",
    [
        ((37,), 24, 300, None, -100),
        ((2, 35), 32, 1000, 80.0, -100),  # large logits: the running maximum must keep exp in range
        ((41,), 64, 5000, None, -100),
        ((3, 13), 24, 777, 30.0, 7),  # an ignore_index inside the vocabulary
    ],
)
def test_matches_float64_reference(impl, leading_shape, dim, vocab_size, max_logit, ignore_index):
    hidden, weight, labels = _problem(
        leading_shape, dim, vocab_size, max_logit=max_logit, ignore_index=ignore_index, seed=vocab_size
    )
    if ignore_index == 7:
        labels.view(-1)[3] = 7  # (also ignored through its value, not only by position)
    want = _sums_and_grads(lambda h, w, y: _reference_sums(h, w, y, ignore_index), hidden, weight, labels)
    got = _sums_and_grads(
        lambda h, w, y: fused_lm_loss_sums(h, w, y, ignore_index=ignore_index, impl=impl), hidden, weight, labels
    )
    assert got[0].dtype == got[1].dtype == torch.float32
    assert _rel(got[0], want[0]) < TOL and _rel(got[1], want[1]) < TOL
    for got_grad, want_grad in zip(got[2], want[2], strict=True):
        assert got_grad.dtype == torch.float32 and got_grad.shape == want_grad.shape
        assert _rel(got_grad, want_grad) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_matches_unfused_loss(impl):
    hidden, weight, labels = _problem((2, 30), 48, 1000, max_logit=20.0, seed=1)

    def unfused(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = language_model_loss_sums(F.linear(h, w), y)
        return sums.cross_entropy, sums.z_loss

    def fused(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_lm_loss_sums(h, w, y, impl=impl)

    want = _sums_and_grads(unfused, hidden, weight, labels)
    got = _sums_and_grads(fused, hidden, weight, labels)
    assert _rel(got[0], want[0]) < 1e-3 and _rel(got[1], want[1]) < 1e-3
    for got_grad, want_grad in zip(got[2], want[2], strict=True):
        assert got_grad.dtype == want_grad.dtype == torch.float32
        assert _rel(got_grad, want_grad) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_come_back_in_input_dtypes(impl):
    hidden, weight, labels = _problem((37,), 24, 300, seed=2)
    hidden = hidden.bfloat16().requires_grad_(True)  # no autocast: the logits are bf16, hidden's dtype
    weight.requires_grad_(True)
    cross_entropy, z_loss = fused_lm_loss_sums(hidden, weight, labels, impl=impl)
    (cross_entropy + z_loss).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    want = _reference_sums(hidden.detach().float(), weight.detach().bfloat16().float(), labels)
    assert _rel(cross_entropy, want[0]) < 1e-3 and _rel(z_loss, want[1]) < 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("output", [0, 1])
def test_one_output_alone(impl, output):
    hidden, weight, labels = _problem((45,), 32, 600, max_logit=10.0, seed=3)
    coefficients = (1.0, 0.0) if output == 0 else (0.0, 1.0)
    want = _sums_and_grads(_reference_sums, hidden, weight, labels, coefficients)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    fused_lm_loss_sums(h, w, labels, impl=impl)[output].backward()  # the other output gets no gradient
    assert _rel(h.grad, want[2][0]) < TOL and _rel(w.grad, want[2][1]) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl):
    hidden, weight, _ = _problem((40,), 24, 300, seed=4)
    labels = torch.full((40,), -100)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    cross_entropy, z_loss = fused_lm_loss_sums(hidden, weight, labels, impl=impl)
    (2.0 * cross_entropy + 3.0 * z_loss).backward()
    assert cross_entropy.item() == 0.0 and z_loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_passes_match_formula(impl, dtype):
    """The two per-row passes on their own: logsumexp and target, then the in-place gradient
    softmax * softmax_scale - target_scale * onehot(label), with its one-hot term on the label only."""
    row_stats, gradient_ = lm_loss._row_passes(impl)
    gen = torch.Generator().manual_seed(5)
    num_rows, vocab_size = 53, 700
    logits = (8 * torch.randn(num_rows, vocab_size, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    labels[:4] = torch.tensor([0, vocab_size - 1, -100, vocab_size])  # out of range: NaN target, no one-hot
    softmax_scale = torch.randn(num_rows, generator=gen)
    target_scale = torch.randn(num_rows, generator=gen)

    lse, target = row_stats(logits, labels)
    exact = logits.double()
    assert _rel(lse, torch.logsumexp(exact, -1)) < TOL
    assert torch.isnan(target[2:4]).all()
    assert torch.equal(target[4:], exact[torch.arange(4, num_rows), labels[4:]].float())
    assert target[0] == exact[0, 0] and target[1] == exact[1, -1]

    want = torch.softmax(exact, -1) * softmax_scale.double()[:, None]
    rows = torch.arange(num_rows)[(labels >= 0) & (labels < vocab_size)]
    want[rows, labels[rows]] -= target_scale.double()[rows]
    gradient_(logits, labels, lse, softmax_scale, target_scale)
    assert logits.dtype == dtype
    assert _rel(logits, want) < (TOL if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_runs_once(impl):
    hidden, weight, labels = _problem((37,), 24, 300, seed=6)
    hidden.requires_grad_(True)
    cross_entropy, _ = fused_lm_loss_sums(hidden, weight, labels, impl=impl)
    cross_entropy.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        cross_entropy.backward()


def test_rejects_bad_inputs():
    hidden, weight, labels = _problem((2, 5), 8, 50)
    with pytest.raises(ValueError, match="leading shape"):
        fused_lm_loss_sums(hidden, weight, labels.view(-1))
    with pytest.raises(ValueError, match="same d"):
        fused_lm_loss_sums(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="int64"):
        fused_lm_loss_sums(hidden, weight, labels.int())
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_lm_loss_sums(hidden, weight, labels, impl="cuda")
    for bad_label in (50, -1):
        bad = labels.clone()
        bad[1, 2] = bad_label
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\)"):
            fused_lm_loss_sums(hidden, weight, bad, impl="torch")


def test_auto_takes_pytorch_on_cpu_even_under_the_interpreter():
    # TRITON_INTERPRET=1 is set for these tests; "auto" must still not run the slow interpreter
    # (every CPU training step goes through it).
    hidden = torch.randn(3, 4)
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert lm_loss._choose_impl("auto", hidden) == "torch"
    assert lm_loss._choose_impl("triton", hidden) == "triton"
