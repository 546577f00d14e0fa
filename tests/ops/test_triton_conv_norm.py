"""Triton short conv (+ SiLU, cache, documents, decode step) and gated RMSNorm against their PyTorch
references in hybridlm.ops.conv / hybridlm.ops.norm, in float64 on the reference side.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1). Budget: ~10 s on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hybridlm.ops.conv import causal_conv1d  # noqa: E402
from hybridlm.ops.norm import gated_rms_norm  # noqa: E402
from hybridlm.ops.triton import causal_conv1d_triton, causal_conv1d_update_, gated_rms_norm_triton  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "batch, seq_len, cu_seqlens, with_cache, activation, width",
    [
        (2, 37, None, False, "silu", 4),
        (2, 37, None, True, "silu", 4),
        (1, 50, [0, 2, 20, 20, 50], False, "silu", 4),  # a 2-token and an empty document
        (1, 50, [0, 2, 20, 20, 50], True, None, 4),
        (2, 150, None, False, "silu", 4),  # several row blocks: the backward's shifted reads cross them
        (1, 200, [0, 63, 64, 130, 200], True, "silu", 4),  # documents ending at and across block edges
        (1, 200, [0, 1, 64, 130, 200], True, "silu", 3),  # a width below its power of two
    ],
)
def test_causal_conv1d_matches_reference(batch, seq_len, cu_seqlens, with_cache, activation, width):
    channels = 70  # a partial channel block
    gen = torch.Generator().manual_seed(seq_len + with_cache)
    x = torch.randn(batch, seq_len, channels, dtype=torch.float64, generator=gen)
    weight = torch.randn(channels, 1, width, dtype=torch.float64, generator=gen)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    num_seqs = batch if cu is None else cu.numel() - 1
    cache = torch.randn(num_seqs, channels, width - 1, dtype=torch.float64, generator=gen) if with_cache else None
    x.requires_grad_(True)
    weight.requires_grad_(True)
    kwargs = dict(activation=activation, output_final_state=True, cu_seqlens=cu)
    y, final = causal_conv1d(x, weight, initial_state=cache, **kwargs)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad((y * dy).sum(), [x, weight])

    x32 = x.detach().float().requires_grad_(True)
    w32 = weight.detach().float().requires_grad_(True)
    y2, final2 = causal_conv1d_triton(x32, w32, initial_state=None if cache is None else cache.float(), **kwargs)
    got = torch.autograd.grad((y2 * dy.float()).sum(), [x32, w32])
    assert _rel(y2, y) < TOL and _rel(final2, final) < TOL
    assert _rel(got[0], want[0]) < TOL and _rel(got[1], want[1]) < TOL


def test_causal_conv1d_update_matches_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 40, generator=gen)
    weight = torch.randn(40, 1, 4, generator=gen)
    state = torch.randn(3, 40, 3, generator=gen)
    y, final = causal_conv1d(x, weight, initial_state=state, output_final_state=True)
    y2 = causal_conv1d_update_(x, weight, state)
    assert _rel(y2, y) < TOL and torch.equal(state, final)


def test_causal_conv1d_refuses_differentiable_cache():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_triton(x, torch.randn(8, 4), initial_state=torch.randn(1, 8, 3, requires_grad=True))


@pytest.mark.parametrize("dim", [48, 192])  # 192: not a power of two (the 7B value head dim)
def test_gated_rms_norm_matches_reference(dim):
    gen = torch.Generator().manual_seed(dim)
    x, gate = (torch.randn(5, 3, dim, dtype=torch.float64, generator=gen) for _ in range(2))
    weight = torch.randn(dim, dtype=torch.float64, generator=gen)
    inputs = [x.requires_grad_(True), gate.requires_grad_(True), weight.requires_grad_(True)]
    y = gated_rms_norm(x, gate, weight, 1e-5)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad((y * dy).sum(), inputs)
    inputs32 = [t.detach().float().requires_grad_(True) for t in inputs]
    y2 = gated_rms_norm_triton(*inputs32, 1e-5)
    got = torch.autograd.grad((y2 * dy.float()).sum(), inputs32)
    assert _rel(y2, y) < TOL
    for a, b in zip(got, want):
        assert _rel(a, b) < TOL


def test_gated_rms_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        gated_rms_norm_triton(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8), 1e-5)
