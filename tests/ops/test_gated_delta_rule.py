"""The gated delta rule on CPU: chunk and recurrent against the float64 reference, gradients,
state carry-over, packed documents, extreme gates, bf16, dispatch and input errors.

Budget: about 60 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.ops import gated_delta_rule
from hybridlm.ops.gated_delta_rule import available_impls, dispatch, naive_gated_delta_rule, register_backend

IMPLS = ["chunk", "recurrent"]
FP32_TOL = 1e-5
BF16_TOL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gates(shape, kind: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Log decays g <= 0 of one kind: none, ordinary, very strong, or a mixture of all of them."""
    if kind == "zero":  # no decay at all
        return torch.zeros(shape, dtype=dtype)
    if kind == "normal":
        return -torch.rand(shape, generator=gen, dtype=dtype)
    if kind == "strong":  # -30 per step: the decay over one chunk reaches e^-1920
        return torch.full(shape, -30.0, dtype=dtype)
    if kind == "mixed":  # 0, tiny, ordinary and -30 side by side, so tiny decays meet huge ones
        choices = torch.tensor([0.0, -1e-4, -0.5, -30.0], dtype=dtype)
        return choices[torch.randint(0, 4, shape, generator=gen)]
    raise ValueError(kind)


def _inputs(
    batch,
    seq_len,
    heads,
    value_heads,
    key_dim,
    value_dim,
    *,
    gates="normal",
    num_states=None,
    seed=0,
    normalize=False,
):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    if normalize:  # unit keys: what use_qk_l2norm=False expects from the caller
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(batch, seq_len, value_heads, value_dim, generator=gen)
    g = _gates((batch, seq_len, value_heads), gates, gen)
    beta = torch.rand(batch, seq_len, value_heads, generator=gen) * 2  # (0, 2): negative eigenvalues
    h0 = torch.randn(num_states or batch, value_heads, key_dim, value_dim, generator=gen)
    return q, k, v, g, beta, h0


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())


def _check_against_reference(q, k, v, g, beta, h0, *, tol=FP32_TOL, **kwargs):
    ref_o, ref_s = naive_gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs
    )
    for impl in IMPLS:
        o, s = gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl, **kwargs
        )
        assert o.dtype == q.dtype and s.dtype == torch.float32
        assert torch.isfinite(o).all() and torch.isfinite(s).all(), impl
        assert _rel(o, ref_o) <= tol, (impl, "o", _rel(o, ref_o))
        assert _rel(s, ref_s) <= tol, (impl, "final state", _rel(s, ref_s))


@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("gates", ["zero", "normal", "strong", "mixed"])
def test_forward_matches_reference(seq_len, gates):
    # Grouped values (HV = 2 H), beta in (0, 2), T around and across chunk boundaries.
    _check_against_reference(*_inputs(2, seq_len, 2, 4, 16, 8, gates=gates, seed=seq_len))


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_forward_options(with_initial_state, use_qk_l2norm):
    q, k, v, g, beta, h0 = _inputs(1, 130, 1, 3, 12, 20, gates="mixed", normalize=not use_qk_l2norm)
    _check_against_reference(
        q, k, v, g, beta, h0 if with_initial_state else None, scale=0.37, use_qk_l2norm=use_qk_l2norm
    )


def test_packed_documents():
    # Length-1 documents, documents shorter and longer than a chunk, and an empty one.
    lengths = [1, 63, 64, 65, 1, 0, 130, 7]
    cu_seqlens = _cu_seqlens(lengths)
    q, k, v, g, beta, h0 = _inputs(1, sum(lengths), 2, 4, 8, 8, gates="mixed", num_states=len(lengths))
    _check_against_reference(q, k, v, g, beta, h0, cu_seqlens=cu_seqlens)
    # Each document on its own gives the same outputs and final state.
    o, s = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens
    )
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        if end == start:
            assert torch.equal(s[n], h0[n])
            continue
        piece = [x[:, start:end] for x in (q, k, v, g, beta)]
        o_n, s_n = gated_delta_rule(
            *piece, initial_state=h0[n : n + 1], output_final_state=True, impl="chunk"
        )
        assert _rel(o[:, start:end], o_n) <= FP32_TOL and _rel(s[n : n + 1], s_n) <= FP32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_two_pieces_equal_one(impl):
    q, k, v, g, beta, h0 = _inputs(2, 150, 2, 2, 16, 16, gates="mixed")
    whole_o, whole_s = gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl
    )
    state, outputs = h0, []
    for piece in (slice(0, 70), slice(70, 71), slice(71, 150)):  # includes a one-token decode step
        o, state = gated_delta_rule(
            *(x[:, piece] for x in (q, k, v, g, beta)),
            initial_state=state,
            output_final_state=True,
            impl=impl,
        )
        outputs.append(o)
    assert _rel(torch.cat(outputs, dim=1), whole_o) <= FP32_TOL
    assert _rel(state, whole_s) <= FP32_TOL


def test_extreme_gates_are_finite_in_forward_and_backward():
    # Decays far below float32's range inside a chunk (e^-1000 per step), next to no decay at all.
    q, k, v, _, beta, h0 = _inputs(1, 100, 1, 2, 8, 8)
    g = torch.where(torch.arange(100)[None, :, None] % 3 == 0, -1000.0, 0.0).expand(1, 100, 2).clone()
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    ref_o, ref_s = naive_gated_delta_rule(*inputs[:5], initial_state=h0, output_final_state=True)
    for impl in IMPLS:
        o, s = gated_delta_rule(*inputs[:5], initial_state=h0, output_final_state=True, impl=impl)
        assert _rel(o, ref_o) <= FP32_TOL and _rel(s, ref_s) <= FP32_TOL
        grads = torch.autograd.grad(o.sum() + s.sum(), inputs)
        assert all(torch.isfinite(grad).all() for grad in grads), impl


@pytest.mark.parametrize("gates", ["normal", "strong", "mixed", "zero"])
def test_bfloat16_inputs(gates):
    q, k, v, g, beta, h0 = _inputs(2, 100, 2, 4, 16, 16, gates=gates)
    q, k, v, beta = (x.bfloat16() for x in (q, k, v, beta))
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    for impl in IMPLS:
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert torch.isfinite(o).all() and torch.isfinite(s).all()
        assert _rel(o, ref_o) <= BF16_TOL and _rel(s, ref_s) <= BF16_TOL, (
            impl,
            _rel(o, ref_o),
            _rel(s, ref_s),
        )
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    o, _ = gated_delta_rule(*leaves, impl="chunk")
    o.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.dtype == x.dtype for x in leaves)


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 2),
    seq_len=st.integers(1, 140),
    heads=st.integers(1, 2),
    group=st.integers(1, 3),
    key_dim=st.sampled_from([4, 8, 16]),
    value_dim=st.sampled_from([3, 8]),
    gates=st.sampled_from(["zero", "normal", "strong", "mixed"]),
    with_initial_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(
    batch, seq_len, heads, group, key_dim, value_dim, gates, with_initial_state, seed
):
    q, k, v, g, beta, h0 = _inputs(
        batch, seq_len, heads, heads * group, key_dim, value_dim, gates=gates, seed=seed
    )
    _check_against_reference(q, k, v, g, beta, h0 if with_initial_state else None)


# ----------------------------------------------------------------------------------------------------
# Gradients of the chunked form (hand-written backward)


def _grads(fn, inputs, weights, **kwargs):
    o, s = fn(*inputs[:5], initial_state=inputs[5], output_final_state=True, **kwargs)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


def _float64_inputs(*shape_args, cu_seqlens=None, **kwargs):
    num_states = None if cu_seqlens is None else len(cu_seqlens) - 1
    return [x.double().requires_grad_() for x in _inputs(*shape_args, num_states=num_states, **kwargs)]


@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(2, 70, 1, 2, 4, 3), gates="normal"),  # grouped values, two chunks
        dict(shape=(1, 66, 2, 2, 3, 4), gates="mixed", use_qk_l2norm=False, scale=0.7),
        dict(shape=(1, 75, 1, 1, 4, 3), gates="mixed", lengths=[1, 5, 0, 64, 5]),
    ],
    ids=["grouped", "no-l2norm", "packed"],
)
def test_gradcheck_chunk(case):
    cu_seqlens = _cu_seqlens(case["lengths"]) if "lengths" in case else None
    inputs = _float64_inputs(*case["shape"], gates=case["gates"], cu_seqlens=cu_seqlens)
    if not case.get("use_qk_l2norm", True):
        with torch.no_grad():  # unit keys, as the caller must provide without l2norm
            inputs[1] /= inputs[1].norm(dim=-1, keepdim=True)
    options = dict(
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=case.get("use_qk_l2norm", True),
        scale=case.get("scale"),
        impl="chunk",
    )

    def run(*xs):
        o, s = gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, **options)
        return o, s

    assert torch.autograd.gradcheck(run, inputs, fast_mode=True, atol=1e-7, rtol=1e-6)
    # The whole Jacobian-vector product against autograd through the float64 reference recurrence.
    gen = torch.Generator().manual_seed(3)
    out_shape = inputs[2].shape
    weights = (
        torch.randn(out_shape, generator=gen).double(),
        torch.randn(inputs[5].shape, generator=gen).double(),
    )
    reference = {key: value for key, value in options.items() if key != "impl"}
    for ours, theirs in zip(
        _grads(gated_delta_rule, inputs, weights, **options),
        _grads(naive_gated_delta_rule, inputs, weights, **reference),
    ):
        assert _rel(ours, theirs) <= 1e-10


def test_gradient_of_final_state_only():
    inputs = _float64_inputs(1, 67, 1, 2, 4, 3, gates="mixed")

    def final_state(*xs):
        return gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, impl="chunk")[1]

    assert torch.autograd.gradcheck(final_state, inputs, fast_mode=True, atol=1e-7, rtol=1e-6)


def test_gradient_without_initial_state():
    inputs = _float64_inputs(2, 65, 1, 1, 4, 3, gates="normal")[:5]

    def output(*xs):
        return gated_delta_rule(*xs, impl="chunk")[0]

    assert torch.autograd.gradcheck(output, inputs, fast_mode=True, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("gates", ["normal", "mixed"])
def test_float32_gradients_match_float64_reference(gates):
    q, k, v, g, beta, h0 = _inputs(1, 130, 2, 4, 32, 48, gates=gates, seed=7)
    gen = torch.Generator().manual_seed(8)
    weights = (torch.randn(v.shape, generator=gen), torch.randn(h0.shape, generator=gen))
    ours = _grads(
        gated_delta_rule, [x.requires_grad_() for x in (q, k, v, g, beta, h0)], weights, impl="chunk"
    )
    reference_inputs = [x.detach().double().requires_grad_() for x in (q, k, v, g, beta, h0)]
    theirs = _grads(naive_gated_delta_rule, reference_inputs, [w.double() for w in weights])
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], ours, theirs):
        assert a.dtype == torch.float32
        assert _rel(a, b) <= FP32_TOL, (name, _rel(a, b))


# ----------------------------------------------------------------------------------------------------
# Dispatch and input checks


def test_auto_picks_recurrent_for_decoding_and_chunk_for_training(monkeypatch):
    calls = []
    for name in IMPLS:
        backend = dispatch._BACKENDS[name]
        monkeypatch.setitem(
            dispatch._BACKENDS,
            name,
            dispatch.Backend(
                name,
                lambda *a, _n=name, _f=backend.fn, **kw: calls.append(_n) or _f(*a, **kw),
                backend.priority,
                backend.prefers,
            ),
        )
    q, k, v, g, beta, h0 = _inputs(1, 1, 1, 1, 4, 4)
    gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    gated_delta_rule(q.requires_grad_(), k, v, g, beta, initial_state=h0)
    q, k, v, g, beta, h0 = _inputs(1, 300, 1, 1, 4, 4)
    gated_delta_rule(q, k, v, g, beta)
    assert calls == ["recurrent", "chunk", "chunk"]


def test_registered_backend_is_selectable_and_preferred(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    seen = []

    def fake(q, k, v, g, beta, **kwargs):
        seen.append(kwargs["scale"])
        return v.clone(), None

    register_backend("fake", fake, priority=100, prefers=lambda q, needs_grad: q.shape[1] == 5)
    assert "fake" in available_impls()
    q, k, v, g, beta, _ = _inputs(1, 5, 1, 1, 16, 4)
    gated_delta_rule(q, k, v, g, beta)  # auto: the fake backend wants T == 5
    gated_delta_rule(q[:, :4], k[:, :4], v[:, :4], g[:, :4], beta[:, :4], impl="fake", scale=2.0)
    gated_delta_rule(q[:, :4], k[:, :4], v[:, :4], g[:, :4], beta[:, :4])  # auto: not wanted
    assert seen == [0.25, 2.0]


def test_inputs_are_not_modified():
    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 1, 8, 8)
    copies = [x.clone() for x in (q, k, v, g, beta, h0)]
    for impl in IMPLS:
        gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip((q, k, v, g, beta, h0), copies)), impl


def test_autocast_leaves_the_precision_alone():
    # Under bf16 autocast (as in mixed-precision training) the op still computes in float32.
    q, k, v, g, beta, h0 = _inputs(1, 70, 2, 2, 8, 8, gates="mixed")
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    for impl in IMPLS:
        expected = gated_delta_rule(*leaves, initial_state=h0, output_final_state=True, impl=impl)
        expected_grads = torch.autograd.grad(expected[0].sum(), leaves)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, s = gated_delta_rule(*leaves, initial_state=h0, output_final_state=True, impl=impl)
        grads = torch.autograd.grad(o.sum(), leaves)  # backward outside autocast, as PyTorch advises
        assert torch.equal(o, expected[0]) and torch.equal(s, expected[1]), impl
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads)), impl


def test_empty_inputs():
    for batch, seq_len in [(2, 0), (0, 5)]:
        q, k, v, g, beta, h0 = _inputs(batch, seq_len, 1, 2, 4, 3)
        for impl in IMPLS:
            o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl=impl)
            assert o.shape == v.shape and torch.equal(s, h0)


def test_final_state_only_when_asked():
    q, k, v, g, beta, _ = _inputs(1, 3, 1, 1, 4, 4)
    for impl in IMPLS:
        assert gated_delta_rule(q, k, v, g, beta, impl=impl)[1] is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(v=torch.zeros(2, 10, 6, 8)), "v must be [B, T, HV, V]"),
        (dict(v=torch.zeros(2, 9, 4, 8)), "v must be [B, T, HV, V]"),
        (dict(q=torch.zeros(2, 10, 4)), "q must be [B, T, H, K]"),
        (dict(k=torch.zeros(2, 10, 4, 7)), "k must be [B, T, H, K]"),
        (dict(g=torch.zeros(2, 10, 4, 1)), "g must be [B, T, HV]"),
        (dict(beta=torch.zeros(2, 10)), "beta must be [B, T, HV]"),
        (dict(k=torch.zeros(2, 10, 4, 16, dtype=torch.float64)), "share one dtype"),
        (dict(q=torch.zeros(2, 10, 4, 16, dtype=torch.long)), "q must be a floating-point tensor"),
        (dict(initial_state=torch.zeros(3, 8, 16, 8)), "initial_state must be [N, HV, K, V]"),
        (dict(cu_seqlens=torch.tensor([0, 10])), "B == 1"),
        (dict(impl="magic"), "unknown impl 'magic'"),
        (dict(scale=0.0), "scale must be"),
    ],
)
def test_bad_inputs_raise(change, message):
    args = dict(
        q=torch.zeros(2, 10, 4, 16),
        k=torch.zeros(2, 10, 4, 16),
        v=torch.zeros(2, 10, 8, 8),
        g=torch.zeros(2, 10, 8),
        beta=torch.zeros(2, 10, 8),
    )
    args.update(change)
    with pytest.raises(ValueError, match=None) as error:
        gated_delta_rule(**args)
    assert message in str(error.value)
    if change.keys() == {"impl"}:
        assert "chunk" in str(error.value) and "recurrent" in str(error.value)


@pytest.mark.parametrize(
    "cu_seqlens",
    [
        torch.tensor([0, 6, 4, 10]),
        torch.tensor([1, 10]),
        torch.tensor([0, 9]),
        torch.tensor([0.0, 10.0]),
        torch.tensor([10]),
    ],
)
def test_bad_cu_seqlens_raise(cu_seqlens):
    q, k, v, g, beta, _ = _inputs(1, 10, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(
            q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(1, 1, 4, 4)
        )


def test_auto_prefers_split_triton_kernels_for_gpu_tensors(monkeypatch):
    # "triton-split" is auto's first choice for CUDA tensors (a CPU tensor posing as one here); the
    # tf32 "triton" kernels and fla are chosen by name only.
    from hybridlm.ops.gated_delta_rule.triton import backend

    monkeypatch.setattr(backend, "TRITON_AVAILABLE", True)
    ordered = sorted(dispatch._BACKENDS.values(), key=lambda b: -b.priority)
    q = torch.zeros(1, 64, 1, 4)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    wanted = [b.name for b in ordered if b.prefers(q, True)]
    assert wanted[0] == "triton-split"
    assert "triton" not in wanted and "fla" not in wanted
    assert not backend.prefers_triton(q.double(), True)  # float64 stays on the PyTorch paths
