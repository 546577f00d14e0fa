"""Triton gated delta rule (chunked fwd/bwd, recurrent, in-place decode) against the
float64 reference.

Runs the kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1) at small sizes; the same
checks at model sizes on a GPU are in benchmarks/gdn_gpu.py. Budget: ~60 s on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hybridlm.ops.gated_delta_rule import gated_delta_rule, naive_gated_delta_rule  # noqa: E402
from hybridlm.ops.gated_delta_rule.triton import (  # noqa: E402
    chunk_gated_delta_rule_triton,
    chunk_gated_delta_rule_triton_split,
    gated_delta_rule_decode_,
    recurrent_gated_delta_rule_triton,
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hybridlm.ops.gated_delta_rule.triton.kernels_split import _pow2_pair, _unit_lower_inverse  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)

# The interpreter computes in float32 (numpy); float32 inputs must match the float64 reference to
# float32 rounding (two-term bf16 splits for "triton-split"), far under the 5e-3 bar for bf16.
TOL = 1e-4
CHUNKED = pytest.mark.parametrize("chunked", [chunk_gated_delta_rule_triton_split], ids=["triton-split"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch, seq_len, heads, value_heads, key_dim, value_dim, *, gate_scale=0.5, num_seqs=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen)
    v = torch.randn(batch, seq_len, value_heads, value_dim, generator=gen)
    g = -torch.rand(batch, seq_len, value_heads, generator=gen) * gate_scale
    beta = torch.rand(batch, seq_len, value_heads, generator=gen) * 2  # negative eigenvalues allowed
    h0 = torch.randn(num_seqs or batch, value_heads, key_dim, value_dim, generator=gen)
    return q, k, v, g, beta, h0


def _check_fwd_bwd(chunked, q, k, v, g, beta, h0, *, cu_seqlens=None, use_qk_l2norm=True, tol=TOL, do_scale=1.0):
    inputs = [q, k, v, g, beta] + ([h0] if h0 is not None else [])
    for x in inputs:
        x.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    do = (torch.randn(v.shape, generator=gen) * do_scale).to(v.dtype)
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    dht = torch.randn(num_seqs, *v.shape[2:3], q.shape[3], v.shape[3], generator=gen)
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    kwargs = dict(output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    ref_o, ref_s = naive_gated_delta_rule(*ref_inputs[:5], initial_state=ref_inputs[5] if h0 is not None else None, **kwargs)
    ref_grads = torch.autograd.grad((ref_o * do.double()).sum() + (ref_s * dht.double()).sum(), ref_inputs)
    o, s = chunked(q, k, v, g, beta, initial_state=h0, **kwargs)
    grads = torch.autograd.grad((o * do).sum() + (s * dht).sum(), inputs)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)
    assert _rel(o, ref_o) < tol, f"o: {_rel(o, ref_o):.2e}"
    assert _rel(s, ref_s) < tol, f"final state: {_rel(s, ref_s):.2e}"
    for name, got, want in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, ref_grads):
        assert _rel(got, want) < tol, f"{name}: {_rel(got, want):.2e}"


@CHUNKED
def test_chunk_grouped_values_partial_chunk_initial_state(chunked):
    # T = 100: one full chunk and a partial one; HV = 2 H (grouped values); beta up to 2.
    _check_fwd_bwd(chunked, *_inputs(2, 100, 1, 2, 16, 32))


@CHUNKED
def test_chunk_wider_keys_no_initial_state(chunked):
    q, k, v, g, beta, _ = _inputs(1, 70, 2, 2, 32, 16, seed=2)
    _check_fwd_bwd(chunked, q, k, v, g, beta, None)


@CHUNKED
def test_chunk_packed_documents_extreme_gates(chunked):
    # Documents of 1, 63, 0, 64 and 21 tokens; per-step decays down to exp(-30) and exact 1s.
    cu_seqlens = torch.tensor([0, 1, 64, 64, 128, 149])
    q, k, v, g, beta, h0 = _inputs(1, 149, 1, 1, 16, 16, gate_scale=30.0, num_seqs=5, seed=3)
    g[:, ::7] = 0.0
    _check_fwd_bwd(chunked, q, k, v, g, beta, h0, cu_seqlens=cu_seqlens)


@CHUNKED
def test_chunk_without_l2norm(chunked):
    q, k, v, g, beta, h0 = _inputs(1, 80, 1, 1, 16, 16, seed=4)
    q, k = q * 0.2, k * 0.2  # keep the unnormalised recurrence well conditioned
    _check_fwd_bwd(chunked, q, k, v, g, beta, h0, use_qk_l2norm=False)


@CHUNKED
def test_chunk_very_small_decays_stay_finite(chunked):
    # exp(g) underflows to 0 in float32: no inf, no NaN, and the state simply restarts.
    q, k, v, g, beta, h0 = _inputs(1, 96, 1, 1, 16, 16, seed=5)
    g.fill_(-1e4)
    o, s = chunked(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert torch.isfinite(o).all() and _rel(o, ref_o) < TOL and _rel(s, ref_s) < TOL


def test_chunk_bfloat16_inputs():
    # Through the older name of the chunked path (the same kernels).
    assert chunk_gated_delta_rule_triton is chunk_gated_delta_rule_triton_split
    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 2, 16, 32, seed=6)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    o, s = chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert _rel(o, ref_o) < 5e-3 and _rel(s, ref_s) < 5e-3


def test_chunk_split_bfloat16_inputs_with_gradients():
    # bf16 q, k, v (the model's dtype) through the split-bf16 matmuls: outputs and every gradient
    # within the 5e-3 bar of float64 (the bf16 rounding of o, dq, dk, dv alone is about 1.7e-3).
    q, k, v, g, beta, h0 = _inputs(1, 70, 1, 2, 16, 32, seed=11)
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, h0, tol=5e-3)


def test_chunk_split_reads_packed_qkv_in_place():
    # The GDN layer's q, k, v are slices of one [B, T, q|k|v] conv output: the kernels read them at
    # their token stride (no copies) and give bit for bit what contiguous copies give.
    from hybridlm.ops.gated_delta_rule.triton.chunk import _flatten_rows

    batch, seq_len, heads, value_heads, key_dim, value_dim = 2, 70, 1, 2, 16, 32
    gen = torch.Generator().manual_seed(12)
    mixed = torch.randn(batch, seq_len, 2 * heads * key_dim + value_heads * value_dim, generator=gen).bfloat16()
    q, k, v = torch.split(mixed, [heads * key_dim, heads * key_dim, value_heads * value_dim], dim=-1)
    q, k = q.unflatten(-1, (heads, key_dim)), k.unflatten(-1, (heads, key_dim))
    v = v.unflatten(-1, (value_heads, value_dim))
    _, _, _, g, beta, h0 = _inputs(batch, seq_len, heads, value_heads, key_dim, value_dim, seed=13)
    flat = _flatten_rows(q, k, v, g, beta)
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(flat[:3], (q, k, v)))
    assert flat[0].stride(0) == flat[2].stride(0) == mixed.shape[-1]
    do = torch.randn(v.shape, generator=gen).bfloat16()

    def run(q, k, v):
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        o, s = chunk_gated_delta_rule_triton_split(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        return (o, s, *torch.autograd.grad((o.float() * do.float()).sum() + s.sum(), inputs))

    packed = run(q, k, v)
    copied = run(q.contiguous(), k.contiguous(), v.contiguous())
    for name, a, b in zip(["o", "final state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], packed, copied):
        assert torch.equal(a, b), name
    # And against float64, through the same checks as the other cases.
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3)


def test_recurrent_matches_reference_with_documents():
    cu_seqlens = torch.tensor([0, 3, 3, 10])
    q, k, v, g, beta, h0 = _inputs(1, 10, 1, 2, 16, 24, num_seqs=3, seed=7)
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    o, s = recurrent_gated_delta_rule_triton(q, k, v, g, beta, **kwargs)
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, **kwargs)
    assert _rel(o, ref_o) < TOL and _rel(s, ref_s) < TOL


def test_decode_step_updates_state_in_place():
    q, k, v, g, beta, h0 = _inputs(3, 4, 2, 4, 16, 16, seed=8)
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state = h0.clone()
    outs = [gated_delta_rule_decode_(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1], state) for t in range(4)]
    assert _rel(torch.cat(outs, dim=1), ref_o) < TOL and _rel(state, ref_s) < TOL


def test_decode_step_rejects_non_float32_state():
    q, k, v, g, beta, h0 = _inputs(1, 1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="float32"):
        gated_delta_rule_decode_(q, k, v, g, beta, h0.double())


def test_dispatcher_runs_triton_by_name():
    q, k, v, g, beta, h0 = _inputs(1, 20, 1, 1, 16, 16, seed=9)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl="triton")
    ref_o, ref_s = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert _rel(o, ref_o) < TOL and _rel(s, ref_s) < TOL


def test_custom_op_registration():
    # Schema, fake (meta) implementation and autograd registration: what torch.compile relies on.
    q, k, v, g, beta, h0 = _inputs(1, 16, 1, 1, 16, 16, seed=10)
    for x in (q, k, v, g, beta, h0):
        x.requires_grad_(True)
    op = torch.ops.hybridlm.gdn_chunk_split.default
    torch.library.opcheck(
        op, (q, k, v, g, beta, h0, None, 0.25, True, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_split_launch_settings(monkeypatch):
    """The sequential kernels get two pipelining stages whenever Triton emits wgmma (one stage
    miscompiles there), and the smallest V tile whose programs all fit on the GPU at once."""
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    cpu = torch.device("cpu")
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "stages_state", 1)
    monkeypatch.setattr(chunk_split, "uses_wgmma", lambda device: True)
    assert chunk_split._state_stages(cpu) == 2
    monkeypatch.setattr(chunk_split, "uses_wgmma", lambda device: False)
    assert chunk_split._state_stages(cpu) == 1
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "stages_state", 0)  # the default: by matmul kind
    assert chunk_split._state_stages(cpu) == 1
    # mma.sync: two programs per SM, V tile <= 32 (the reverse pass spills kilobytes at 64).
    assert chunk_split._state_block_v(192, 30, cpu, backward=True) == 32
    assert chunk_split._state_block_v(192, 8, cpu, backward=False) == 16
    monkeypatch.setattr(chunk_split, "uses_wgmma", lambda device: True)
    assert chunk_split._state_stages(cpu) == 2
    # wgmma, 132 SMs off the GPU; forward programs at V tile 16 fit two per SM, everything else one.
    assert chunk_split._state_block_v(192, 30, cpu, backward=False) == 64  # 7B layer: 360 > 264, 180 > 132
    assert chunk_split._state_block_v(192, 8, cpu, backward=False) == 16  # 96 programs
    assert chunk_split._state_block_v(128, 32, cpu, backward=True) == 32  # 256 > 132, 128 <= 132
    assert chunk_split._state_block_v(32, 1000, cpu, backward=True) == 32  # never above V
    # One-term products (the default for bf16): forward programs of V tile 32 fit two per SM, and
    # the chooser never counts more than two.
    assert chunk_split._state_block_v(192, 30, cpu, backward=False, one_term=True) == 32  # 180 <= 264
    assert chunk_split._state_block_v(192, 30, cpu, backward=True, one_term=True) == 64
    # The float16 reverse pass fits two programs of V tile 32 per SM (112 KB).
    assert chunk_split._state_block_v(192, 30, cpu, backward=True, one_term=True, f16=True) == 32
    assert chunk_split._state_block_v(192, 60, cpu, backward=True, one_term=True, f16=True) == 64
    # Beside the recomputing forward pass (two streams), the reverse pass takes V tile 32.
    assert chunk_split._state_block_v(192, 30, cpu, backward=True, one_term=True, concurrent=True) == 32
    assert chunk_split._state_block_v(16, 30, cpu, backward=True, concurrent=True) == 16
    assert chunk_split._side_stream(cpu) is None
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "state_bwd_block_v", 16)
    assert chunk_split._state_block_v(128, 32, cpu, backward=True) == 16


@pytest.mark.parametrize("options", [("one_term_state_products",), ("one_term_state_products", "one_term_w")])
def test_split_one_term_state_products_bfloat16(monkeypatch, options):
    # The one-term products in the state passes (S in W S and dDelta in W^T dDelta; and W in both)
    # stay within the 5e-3 bar for bf16 inputs; float32 inputs keep both terms and float32 accuracy.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    for option in ("one_term_state_products", "one_term_w", "one_term_output_states", "f16_state_forward"):
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, option, False)
    q, k, v, g, beta, h0 = _inputs(1, 200, 1, 2, 32, 32, seed=12)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    both = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0, output_final_state=True)[1]
    for option in options:
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, option, True)
    one = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0, output_final_state=True)[1]
    assert 1e-7 < _rel(one, both) < 1e-3  # the lo terms were dropped, at about their size
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3)
    assert chunk_split._state_terms(k) == 1 and chunk_split._state_terms(k.float()) == 2
    assert chunk_split._w_terms(k) == (1 if "one_term_w" in options else 2) and chunk_split._w_terms(k.float()) == 2
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, *_inputs(1, 100, 1, 1, 16, 32, seed=13))


@pytest.mark.parametrize("no_decay, v_scale", [(False, 1.0), (True, 1.0), (False, 3e4), (False, 1e-6)])
def test_split_f16_state_forward(monkeypatch, no_decay, v_scale):
    # The forward state pass's float16 products (the default for bf16 inputs with the L2 norm): the
    # final state moves from the two-term one by about float16 rounding, everything stays within the
    # 5e-3 bar, with no decay too (where bf16 one-term products exceed it), and values far beyond
    # float16's range (v * 3e4: states ~1e5; v * 1e-6: below its normal numbers) are scaled into it.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    q, k, v, g, beta, h0 = _inputs(1, 300, 1, 2, 64, 64, seed=19)
    q, k, v = q.bfloat16(), k.bfloat16(), (v * v_scale).bfloat16()
    h0 = h0 * v_scale
    if no_decay:
        g = torch.zeros_like(g)
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "f16_state_forward", False)
    both = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0, output_final_state=True)[1]
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "f16_state_forward", True)
    f16 = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0, output_final_state=True)[1]
    assert torch.isfinite(f16).all() and 1e-6 < _rel(f16, both) < 2e-3
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3)
    assert chunk_split._f16_state_forward(k, True)
    assert not chunk_split._f16_state_forward(k, False) and not chunk_split._f16_state_forward(k.float(), True)


@pytest.mark.parametrize("option, case", [
    ("f16_state_backward", "no decay"), ("f16_state_backward", "dO * 3e4"),
    ("f16_state_backward", "dO * 1e-6, v * 1e-6"), ("f16_state_backward", "one key, beta 1.999"),
    ("f16_inverse", "no decay"), ("f16_inverse", "one key, beta 1.999"),
])
def test_split_f16_reverse_pass_and_inverse(monkeypatch, option, case):
    # The reverse state pass's float16 products (default for bf16 inputs with the L2 norm) and the
    # opt-in float16 triangular inverse: the gradients move from the two-term ones by about float16
    # rounding and stay within the 5e-3 bar of float64, with no decay, with dO and v far outside
    # float16's range (scaled per tile), and with one key repeated at beta near 2, where the
    # entries of T = (I + A)^-1 alternate in sign (the inverse's hardest case: dg 3.5e-3 with both
    # options, 2.3e-4 with neither).
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    q, k, v, g, beta, h0 = _inputs(1, 200, 1, 2, 32, 32, seed=22)
    do_scale = {"dO * 3e4": 3e4, "dO * 1e-6, v * 1e-6": 1e-6}.get(case, 1.0)
    if case == "no decay":
        g = torch.zeros_like(g)
    if case.startswith("dO * 1e-6"):
        v, h0 = v * 1e-6, h0 * 1e-6
    if case.startswith("one key"):
        k = k[:, :1].expand_as(k).clone()
        beta = torch.full_like(beta, 1.999)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    dht = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(3)) * do_scale

    def grads():
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        o, s = chunk_gated_delta_rule_triton_split(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        do = (torch.randn(o.shape, generator=torch.Generator().manual_seed(4)) * do_scale).bfloat16()
        return torch.autograd.grad((o.float() * do.float()).sum() + (s * dht).sum(), inputs)

    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "f16_state_backward", False)
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "f16_inverse", False)
    both = grads()
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, option, True)
    f16 = grads()
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], f16, both):
        assert torch.isfinite(a).all() and _rel(a, b) < 4e-3, name
    assert max(_rel(a, b) for a, b in zip(f16, both)) > 1e-6  # the float16 path ran
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3, do_scale=do_scale)
    check = getattr(chunk_split, "_" + option)
    assert check(k, True) and not check(k, False) and not check(k.float(), True)


def test_split_one_term_output_states_bfloat16(monkeypatch):
    # The one-term chunk-entry states of the forward (bf16 inputs only): the output kernel reads
    # only the hi term, o stays within the 5e-3 bar and differs from the two-term o by about bf16
    # rounding; the backward, which recomputes the states, is unaffected.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_forward", False)  # the pass these options are for
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "one_term_output_states", False)
    q, k, v, g, beta, h0 = _inputs(1, 200, 1, 2, 32, 32, seed=14)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    both = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0)[0]
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "one_term_output_states", True)
    one = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0)[0]
    assert 0 < _rel(one, both) < 5e-3
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3)
    assert chunk_split._output_terms(q) == 1 and chunk_split._output_terms(q.float()) == 2
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, *_inputs(1, 100, 1, 1, 16, 32, seed=15))


def test_split_one_term_grads_bfloat16(monkeypatch):
    # The opt-in one-term operands of the gradient kernels (bf16 inputs only): gradients within the
    # 5e-3 bar and different from the two-term ones by about the dropped terms.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    q, k, v, g, beta, h0 = _inputs(1, 200, 1, 2, 32, 32, seed=16)
    q, k, v = (x.bfloat16().requires_grad_(True) for x in (q, k, v))
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(0)).bfloat16()

    def grads():
        o = chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0)[0]
        return torch.autograd.grad(o, (q, k, v), do)

    both = grads()
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "one_term_grads", True)
    one = grads()
    for a, b in zip(one, both):
        assert 0 < _rel(a, b) < 5e-3
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q.detach(), k.detach(), v.detach(), g, beta, h0, tol=5e-3)
    assert chunk_split._grad_terms(q) == 1 and chunk_split._grad_terms(q.float()) == 2


def test_split_no_decay_bfloat16_defaults():
    # No decay (g = 0) is where one-term products' errors accumulate most: with the opt-in ones in
    # the state passes this case reaches dg 5.9e-3 (docs/benchmarks.md). The defaults (one-term
    # stored states, float16 forward state pass) must stay within the 5e-3 bar here, over several chunks.
    q, k, v, g, beta, h0 = _inputs(1, 640, 1, 2, 64, 64, seed=18)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, torch.zeros_like(g), beta, h0, tol=5e-3)


def _grads_with(monkeypatch, options: dict, q, k, v, g, beta, h0, do_scale=1.0):
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    for name, value in options.items():
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, name, value)
    inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
    o, s = chunk_gated_delta_rule_triton_split(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    gen = torch.Generator().manual_seed(4)
    do = (torch.randn(o.shape, generator=gen) * do_scale).bfloat16()
    dht = torch.randn(s.shape, generator=gen) * do_scale
    return [o] + list(torch.autograd.grad((o.float() * do.float()).sum() + (s * dht).sum(), inputs))


@pytest.mark.parametrize("case", ["no decay", "value columns 1e-6..1e6", "dO * 3e4", "extreme gates, documents"])
def test_split_f16_gradient_kernels(monkeypatch, case):
    # The float16 states of the gradient kernels (`f16_grad_states`, default for bf16 inputs with the
    # L2 norm) and the float16 P Delta of the output kernel (`f16_output_delta`): results move from
    # the two-term ones by about float16 rounding and stay within the 5e-3 bar of float64, with no
    # decay, with value columns (so the state tiles' scales) 2^40 apart, with dO far outside float16's
    # range, and with extreme gates across documents (rows of Delta and dVb scaled per row).
    q, k, v, g, beta, h0 = _inputs(1, 260, 2, 2, 32, 64, seed=31)
    do_scale = 3e4 if case == "dO * 3e4" else 1.0
    if case == "no decay":
        g = torch.zeros_like(g)
    if case.startswith("value columns"):
        cols = torch.logspace(-6, 6, 64)
        v, h0 = v * cols, h0 * cols
    if case.startswith("extreme"):
        g = torch.where(torch.rand(g.shape, generator=torch.Generator().manual_seed(2)) < 0.2, -30.0, g)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_forward", False)  # f16_output_delta is for that pass
    off = dict(f16_grad_states=False, f16_output_delta=False)
    base = _grads_with(monkeypatch, off, q, k, v, g, beta, h0, do_scale)
    f16 = _grads_with(monkeypatch, dict(f16_grad_states=True, f16_output_delta=True), q, k, v, g, beta, h0, do_scale)
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta", "dh0"], f16, base):
        assert torch.isfinite(a).all() and _rel(a, b) < 2e-3, name
    assert _rel(f16[0], base[0]) > 1e-6 and _rel(f16[2], base[2]) > 1e-6  # both float16 paths ran
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, tol=5e-3, do_scale=do_scale)


def test_split_fused_qk_norm_backward(monkeypatch):
    # With one value head per q/k head the gradient kernel goes back through the L2 norms itself; dq
    # and dk must equal the separate norm kernel's up to the float32 -> bf16 rounding order, with and
    # without the norm, and grouped values (HV > H) must keep the separate kernel.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    for heads, value_heads, norm in [(2, 2, True), (2, 2, False), (1, 2, True)]:
        q, k, v, g, beta, h0 = _inputs(1, 150, heads, value_heads, 32, 32, seed=33)
        if not norm:  # unit keys, else the recurrence with beta up to 2 diverges
            q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        results = []
        for fuse in (False, True):
            monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "fuse_qk_norm_backward", fuse)
            inputs = [x.detach().requires_grad_(True) for x in (q, k)]
            o = chunk_gated_delta_rule_triton_split(*inputs, v, g, beta, initial_state=h0, use_qk_l2norm=norm)[0]
            do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
            results.append(torch.autograd.grad(o, inputs, do))
        for a, b in zip(*results):
            assert torch.isfinite(a).all() and torch.isfinite(b).all() and _rel(b, a) < 2**-8, (heads, value_heads, norm)
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, *_inputs(1, 150, 2, 2, 32, 32, seed=34))


@pytest.mark.parametrize("case", ["partial chunk, grouped values, V = 96", "documents, one empty", "v * 3e4",
                                  "v * 1e-6, no initial state", "no decay"])
def test_split_rows_forward(monkeypatch, case):
    # The forward's pass carried as S^T with a power-of-two scale per row (the default for bf16 with
    # the L2 norm). float16 rounds x / e the same way for any power of two e, so under the interpreter
    # (which multiplies float16 operands exactly, as float32) it must equal the pass with tile-wide
    # scales bit for bit, whatever the scales: outputs, final states, and values far outside
    # float16's range (states ~1e5, or below its normal numbers). On a GPU the two differ only by
    # the matmuls' accumulation order (docs/benchmarks.md).
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    cu = None
    if case.startswith("partial"):
        q, k, v, g, beta, h0 = _inputs(1, 200, 1, 2, 32, 96, seed=41)
    elif case.startswith("documents"):
        q, k, v, g, beta, h0 = _inputs(1, 300, 1, 1, 32, 64, num_seqs=4, seed=42)
        cu = torch.tensor([0, 1, 70, 70, 300])
    else:
        q, k, v, g, beta, h0 = _inputs(2, 130, 1, 1, 32, 64, seed=43)
    scale = {"v * 3e4": 3e4, "v * 1e-6, no initial state": 1e-6}.get(case, 1.0)
    v, h0 = v * scale, (None if "no initial" in case else h0 * scale)
    if case == "no decay":
        g = torch.zeros_like(g)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ran = []
    rows_pass = chunk_split._state_forward_rows
    monkeypatch.setattr(chunk_split, "_state_forward_rows", lambda *a: ran.append(1) or rows_pass(*a))
    results = []
    # late: the stores after the matmuls; V tile 128 (two warpgroups on a GPU): each row of S^T is
    # computed as at V tile 64, so the results must not change either
    for rows, late, block_v in [(False, None, 0), (True, False, 0), (True, True, 0), (True, False, 128)]:
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_forward", rows)
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_late_stores", late)
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_block_v", block_v)
        with torch.no_grad():
            results.append(chunk_gated_delta_rule_triton_split(q, k, v, g, beta, initial_state=h0,
                                                               output_final_state=True, cu_seqlens=cu))
    assert ran == [1, 1, 1]
    (o0, s0), *others = results
    assert torch.isfinite(o0).all() and torch.isfinite(s0).all()
    for o1, s1 in others:
        assert torch.equal(o0, o1) and torch.equal(s0, s1)
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_late_stores", None)
    monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "rows_block_v", 0)
    _check_fwd_bwd(chunk_gated_delta_rule_triton_split, q, k, v, g, beta, h0, cu_seqlens=cu, tol=5e-3)
    assert chunk_split._rows_block_v(96) == 64 and chunk_split._rows_block_v(32) == 32


def test_split_rows_tile_choice(monkeypatch):
    # The forward pass's V tile on a Hopper-like device of 132 SMs: 128 (8 warps, 3 stages) only
    # where V is a multiple of 128 and tiles of 64 would put more than one program on an SM.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    device = torch.device("cuda")
    monkeypatch.setattr(chunk_split, "uses_wgmma", lambda d: True)
    monkeypatch.setattr(chunk_split, "_sm_count", lambda d: 132)
    monkeypatch.setattr(chunk_split, "_state_stages", lambda d: 2)
    assert chunk_split._rows_block_v(128, 8 * 16, device) == 128  # (8, 2048, 16, 128, 128): 256 tiles of 64
    assert chunk_split._rows_block_v(128, 64, device) == 64  # 128 tiles of 64: one per SM
    assert chunk_split._rows_block_v(256, 128, device) == 128
    assert chunk_split._rows_block_v(192, 4 * 16, device) == 64  # a tile of 128 would be a third empty
    assert chunk_split._rows_block_v(64, 1000, device) == 64 and chunk_split._rows_block_v(48, 1000, device) == 64
    assert chunk_split._rows_launch(128, device) == (8, 3) and chunk_split._rows_launch(64, device) == (4, 2)
    monkeypatch.setattr(chunk_split, "uses_wgmma", lambda d: False)  # mma.sync: one warpgroup's tile
    assert chunk_split._rows_block_v(128, 8 * 16, device) == 64


def test_split_inverse_diag_option(monkeypatch):
    # KernelOptions.inverse_diag: the inverse's first levels on a batch of diagonal blocks (default
    # 16) or on the whole tile (0): the same outputs and gradients up to rounding order.
    from hybridlm.ops.gated_delta_rule.triton import chunk_split

    assert [chunk_split._log2_diag(n) for n in (0, 1, 16, 32)] == [0, 0, 4, 5]
    for bad in (8, 24, 64):
        with pytest.raises(ValueError, match="inverse_diag must be 0, 1 or a power of two from 16 to 32"):
            chunk_split._log2_diag(bad)
    q, k, v, g, beta, h0 = _inputs(1, 130, 1, 2, 32, 32, seed=53)
    results = []
    for diag in (16, 0):
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "inverse_diag", diag)
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        o, s = chunk_gated_delta_rule_triton_split(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((o * do).sum() + s.sum(), inputs)
        results.append((o, s, *grads))
    for got, want in zip(*results):
        assert _rel(got, want) < 1e-6, f"{_rel(got, want):.2e}"


@triton.jit
def _pow2_pair_kernel(m, e, inv, N: tl.constexpr):
    r = tl.arange(0, N)
    a, b = _pow2_pair(tl.load(m + r))
    tl.store(e + r, a)
    tl.store(inv + r, b)


def test_pow2_pair_reads_the_exponent_bits():
    # The state passes' power-of-two scales: e = 2^(ceil(log2 m) - 14) and 1 / e from the float32
    # bits of m, for powers of two, values just above them, 0 (as 1e-30), and float32's extremes.
    tiny = torch.finfo(torch.float32).tiny
    m = torch.tensor([1.0, 1.0000001, 3.0, 2.0**-20, 0.75, 0.0, 1e-30, 1e-35, tiny, 3.0e38, 65504.0, 7e-3,
                      2.0**14, 2.0**14 + 2.0**-9, 1e5, 2.0**127], dtype=torch.float32)
    e, inv = torch.empty_like(m), torch.empty_like(m)
    _pow2_pair_kernel[(1,)](m, e, inv, N=m.numel())
    want = torch.exp2(torch.ceil(torch.log2(m.double().clamp_min(1e-30))) - 14)
    want[1] = 2.0 ** -13  # 1 + 2^-23 is above 1: log2 rounds that to 0 in float32, the bits do not
    assert torch.equal(e.double(), want)
    assert torch.equal(inv.double(), 1 / want)
    ratio = m.double().clamp_min(1e-30) / e.double()
    assert ((ratio > 2.0**13) & (ratio <= 2.0**14)).all()


def test_sequence_layout_is_reused_for_equal_lengths():
    from hybridlm.ops.gated_delta_rule.triton.layout import sequence_layout

    cpu = torch.device("cpu")
    a = sequence_layout(3, 130, None, cpu)
    assert sequence_layout(3, 130, None, cpu) is a and sequence_layout(3, 129, None, cpu) is not a
    assert a.cu_seqlens.tolist() == [0, 130, 260, 390] and a.chunk_offsets.tolist() == [0, 3, 6, 9]
    assert a.chunk_seq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and a.chunk_local.tolist() == [0, 1, 2] * 3


@triton.jit
def _unit_lower_inverse_kernel(a, t, BT: tl.constexpr, LOG2_BT: tl.constexpr, LOG2_DIAG: tl.constexpr):
    r = tl.arange(0, BT)
    offsets = r[:, None] * BT + r[None, :]
    tl.store(t + offsets, _unit_lower_inverse(tl.load(a + offsets), BT, LOG2_BT, LOG2_DIAG))


@pytest.mark.parametrize("log2_diag", [0, 4, 5])
@pytest.mark.parametrize("case, bar", [("normalised keys, beta up to 2", 1e-5), ("one key, beta 1.999", 3e-4),
                                       ("no decay, beta 2", 5e-5)])
def test_unit_lower_inverse_matches_float64(case, bar, log2_diag):
    # The prepare kernel's T = (I + A)^-1 (block doubling, each level's product taken with the whole
    # of A and masked; with log2_diag, the levels up to blocks of 2^log2_diag on a batch of the
    # diagonal blocks instead) against float64, A = diag(beta) (K K^T * decay) strictly below the
    # diagonal as the kernel builds it, with entries up to 2 where the inverse's entries alternate
    # in sign. The bars follow I + A's condition number (4.7, 1000, 36): each is at least 15x below
    # the error that rounding A to one bf16 term alone gives (1.0e-3, 4.4e-2, 4.9e-3).
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    if case.startswith("one key"):
        k = k[:1].expand(64, 32)
    k = k / k.norm(dim=-1, keepdim=True)
    beta = torch.rand(64, generator=gen, dtype=torch.float64) * 2
    gam = torch.cumsum(-torch.rand(64, generator=gen, dtype=torch.float64) * 0.1, 0)
    if case != "normalised keys, beta up to 2":
        beta = torch.full_like(beta, 1.999 if case.startswith("one key") else 2.0)
    if case.startswith("no decay"):
        gam = torch.zeros_like(gam)
    a = (beta[:, None] * (k @ k.T) * torch.exp(gam[:, None] - gam[None, :])).tril(-1).float()
    t = torch.empty_like(a)
    _unit_lower_inverse_kernel[(1,)](a, t, BT=64, LOG2_BT=6, LOG2_DIAG=log2_diag)
    want = torch.linalg.inv(torch.eye(64, dtype=torch.float64) + a.double())
    assert torch.equal(t.triu(1), torch.zeros_like(t)) and torch.equal(t.diagonal(), torch.ones(64))
    assert _rel(t, want) < bar, f"{_rel(t, want):.2e}"


def test_split_uniform_batch_slots(monkeypatch):
    # For a batch of equal-length sequences the per-chunk kernels compute where each slot sits
    # (SequenceLayout.uniform_len) instead of reading the layout: outputs and gradients must equal
    # the read layout's bit for bit (T not a multiple of the chunk, grouped values).
    from hybridlm.ops.gated_delta_rule.triton import chunk_split
    from hybridlm.ops.gated_delta_rule.triton.layout import sequence_layout

    cpu = torch.device("cpu")
    assert sequence_layout(3, 130, None, cpu).uniform_len == 130
    assert sequence_layout(1, 130, torch.tensor([0, 60, 130]), cpu).uniform_len == 0
    q, k, v, g, beta, h0 = _inputs(3, 130, 1, 2, 32, 32, seed=51)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    results = []
    for uniform in (False, True):
        monkeypatch.setattr(chunk_split.SPLIT_OPTIONS, "uniform_slots", uniform)
        inputs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, h0)]
        o, s = chunk_gated_delta_rule_triton_split(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
        results.append([o, s, *torch.autograd.grad((o.float() * do.float()).sum() + s.sum(), inputs)])
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)
