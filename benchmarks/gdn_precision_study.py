"""How much precision the chunked forward's sequential state pass needs: a float64 emulation.

    python benchmarks/gdn_precision_study.py [--cases 0,1,2,3,4,5] [--threads 2]

The "triton-split" kernels carry float32 matmul operands as two bf16 terms (hi + lo), which costs
two or three bf16 matmuls per product; for bf16 inputs, the ones this study found safe (S and W in
W S, dDelta and W in W^T dDelta, the stored states) take one term by default (`KernelOptions`).
In the forward state pass, the sequential part of the forward (and of the backward's
recomputation), each chunk step does

    Delta = U - W S          (W, S both split: 3 matmuls)
    S <- e^gamma_C S + K^T (kscale * Delta)      (K raw bf16, kscale * Delta split: 2 matmuls)

and stores S and Delta (split) for the output kernel, O = qscale * (q S) + P Delta. This script
replays exactly that algorithm in float64 on the CPU, rounding chosen operands as the GPU would
(bf16 round-to-nearest-even; a split x = bf16(x) + bf16(x - bf16(x)) of the float32 value), and
reports the relative error of o (rounded to bf16 like the kernels' output) and of the final state
against the same algorithm without rounding. Variants drop the lo term of one operand at a time:
the question for a faster state pass is which of them stay well under the 5e-3 bar. The reverse
state pass of the backward (`backward_state_pass`) is studied the same way (dDelta and dh0).

Inputs as in benchmarks/gdn_gpu.py: bf16 q, k, v; g from the model's parameterisation (or extreme
gates); beta = 2 sigmoid(randn); a random float32 initial state; bf16 dO and a float32 dht.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

CHUNK = 64

# Which operands lose their lo term (one bf16 term instead of two) in each variant.
VARIANTS = {
    "split everywhere (float32 inputs)": set(),
    "S one term in Delta = U - W S": {"S_in_delta"},
    "kscale*Delta one term in the state update": {"delta_in_update"},
    "both of the above": {"S_in_delta", "delta_in_update"},
    "stored S one term (output kernel)": {"S_stored"},
    "stored Delta one term (output kernel)": {"delta_stored"},
    "W one term": {"W"},
    "S in W S, stored S": {"S_in_delta", "S_stored"},
    "S in W S, stored S and W (the kernels' defaults for bf16 inputs)": {"S_in_delta", "S_stored", "W"},
    "all one term (fla's choice)": {"S_in_delta", "delta_in_update", "S_stored", "delta_stored", "W", "P", "U"},
    # T = (I + A)^-1 by the prepare kernel's doubling (`_unit_lower_inverse`) instead of exactly:
    "T by the kernels' doubling, two-term products": {"T_doubling"},
    "T by the doubling with float16 products (scaled per tile)": {"T_f16"},
}

CASES = [
    ("T=1000, HV=4, K=96, V=192", dict(seq_len=1000, heads=4, key_dim=96, value_dim=192)),
    ("T=4096, HV=4, K=128, V=128, extreme gates", dict(seq_len=4096, heads=4, key_dim=128, value_dim=128, gates="extreme")),
    ("T=8192, HV=8, K=96, V=192", dict(seq_len=8192, heads=8, key_dim=96, value_dim=192)),
    ("T=65536, HV=2, K=128, V=256", dict(seq_len=65536, heads=2, key_dim=128, value_dim=256)),
    ("T=8192, HV=4, K=96, V=192, no decay", dict(seq_len=8192, heads=4, key_dim=96, value_dim=192, gates="none")),
    ("T=65536, HV=1, K=128, V=256, no decay", dict(seq_len=65536, heads=1, key_dim=128, value_dim=256, gates="none")),
]


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def operand(x: torch.Tensor, name: str, one_term: set[str] | None) -> torch.Tensor:
    """x as a matmul operand: exact (one_term None: the unrounded reference), one bf16 term, or the
    two-term split of its float32 value."""
    if one_term is None:
        return x
    if name in one_term:
        return bf16(x)
    x32 = x.to(torch.float32).to(torch.float64)
    hi = bf16(x32)
    return hi + bf16(x32 - hi)


def f32(x: torch.Tensor, one_term: set[str] | None) -> torch.Tensor:
    return x if one_term is None else x.to(torch.float32).to(torch.float64)


def f16_scaled(x: torch.Tensor) -> torch.Tensor:
    """x [..., R, C] as the kernels' scaled float16 operand: per matrix, a power of two e puts the
    largest |x| in (2^13, 2^14], and x = e * float16(x / e)."""
    m = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    e = torch.exp2(torch.ceil(torch.log2(m)) - 14.0)
    return (x / e).to(torch.float16).to(torch.float64) * e


def unit_lower_inverse(A: torch.Tensor, one_term: set[str]) -> torch.Tensor:
    """(I + A)^-1 for strictly lower A [..., n, n] as `_unit_lower_inverse` computes it (blocks doubled
    from 2 to 64, inv <- inv + (-(inv C)) inv, float32 accumulation), with the products' operands as
    two-term splits ("T_doubling") or scaled float16 ("T_f16")."""
    n = A.shape[-1]
    idx = torch.arange(CHUNK)
    ii, jj = idx[:, None], idx[None, :]
    full = torch.zeros(*A.shape[:-2], CHUNK, CHUNK, dtype=A.dtype)
    full[..., :n, :n] = A
    term = f16_scaled if "T_f16" in one_term else (lambda x: operand(x, "", set()))
    inv = torch.where(ii == jj, 1.0, 0.0).to(A.dtype) - torch.where((ii // 2) == (jj // 2), full, 0.0)
    for level in range(2, 7):
        same_block = (ii >> level) == (jj >> level)
        other_half = (ii >> (level - 1)) != (jj >> (level - 1))
        C = torch.where(same_block & other_half, full, 0.0)
        X = f32(-(term(inv) @ term(C)), one_term)
        inv = f32(inv + term(X) @ term(inv), one_term)
    return inv[..., :n, :n]


def make_inputs(seq_len, heads, key_dim, value_dim, gates="model", seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q = bf16(randn(heads, seq_len, key_dim))
    k = bf16(randn(heads, seq_len, key_dim))
    v = bf16(randn(heads, seq_len, value_dim))
    if gates == "model":
        rate = torch.rand(heads, 1, generator=gen) * 16
        g = -rate * F.softplus(randn(heads, seq_len) - 4.0)
    elif gates == "none":  # no decay: only the delta rule's own overwriting forgets
        g = torch.zeros(heads, seq_len)
    else:
        g = -30.0 * torch.rand(heads, seq_len, generator=gen)
        g[:, ::7] = 0.0
    beta = 2.0 * torch.sigmoid(randn(heads, seq_len))
    h0 = randn(heads, key_dim, value_dim)
    return q, k, v, g.double(), beta.double(), h0.double()


def forward(q, k, v, g, beta, h0, one_term: set[str] | None):
    """The kernels' forward per value head (o rounded to bf16 unless one_term is None), final state."""
    heads, seq_len, key_dim = q.shape
    scale = key_dim**-0.5
    rq = torch.rsqrt((q * q).sum(-1) + 1e-6)
    rk = torch.rsqrt((k * k).sum(-1) + 1e-6)
    S = h0.clone()
    out = torch.empty_like(v)
    eye = torch.eye(CHUNK, dtype=torch.float64)
    for t0 in range(0, seq_len, CHUNK):
        sl = slice(t0, min(t0 + CHUNK, seq_len))
        n = sl.stop - sl.start
        qc, kc, vc, bc = q[:, sl], k[:, sl], v[:, sl], beta[:, sl]
        gam = g[:, sl].cumsum(-1)
        diff = gam[:, :, None] - gam[:, None, :]
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
        decay = torch.where(lower, diff.clamp(max=0.0), torch.tensor(float("-inf"), dtype=torch.float64)).exp()
        A = (kc @ kc.transpose(1, 2)) * (bc * rk[:, sl])[:, :, None] * rk[:, None, sl] * decay
        if one_term is not None and one_term & {"T_doubling", "T_f16"}:
            T = unit_lower_inverse(f32(A, one_term), one_term)
        else:
            T = torch.linalg.solve_triangular(eye[:n, :n] + A, eye[:n, :n].expand(heads, n, n), upper=False,
                                              unitriangular=True)
        W = operand((T * (bc * gam.exp() * rk[:, sl])[:, None, :]) @ kc, "W", one_term)
        U = f32(operand(T * bc[:, None, :], "U", one_term) @ vc, one_term)
        kscale = rk[:, sl] * (gam[:, -1:] - gam).exp()
        delta = f32(U - W @ operand(S, "S_in_delta", one_term), one_term)
        # The output kernel: O = (scale r_q e^gamma) * (q S) + P Delta, from the stored S and Delta.
        incl = torch.tril(torch.ones(n, n, dtype=torch.bool))
        gate = torch.where(incl, diff.clamp(max=0.0), torch.tensor(float("-inf"), dtype=torch.float64)).exp()
        P = (qc @ kc.transpose(1, 2)) * (scale * rq[:, sl])[:, :, None] * rk[:, None, sl] * gate
        o = (scale * rq[:, sl] * gam.exp())[:, :, None] * (qc @ operand(S, "S_stored", one_term))
        o = o + operand(P, "P", one_term) @ operand(delta, "delta_stored", one_term)
        out[:, sl] = o if one_term is None else bf16(o)
        update = kc.transpose(1, 2) @ operand(kscale[:, :, None] * delta, "delta_in_update", one_term)
        S = f32(gam[:, -1:, None].exp() * S + update, one_term)
    return out, S


# The reverse state pass (`_state_bwd_kernel`): per chunk, last to first,
#     dDelta = P^T dO + kscale * (k dS)        (k raw, dS split: 2 matmuls)
#     dS <- e^gamma_C dS + q^T (qscale * dO) - W^T dDelta   (2 + 3 matmuls)
# with dS the gradient of the state leaving the chunk. Errors of dh0 (dS at the start) and of dDelta
# (which feeds dv, dq, dk, dbeta and dg) against the unrounded pass.
BACKWARD_VARIANTS = {
    "split everywhere (float32 inputs)": set(),
    "dS one term in k dS": {"dS_in_ddelta"},
    "dDelta one term in W^T dDelta": {"ddelta_in_update"},
    "qscale*dO one term in q^T (qscale dO)": {"do_in_update"},
    "dS and dDelta one term": {"dS_in_ddelta", "ddelta_in_update"},
    "dDelta and W one term (the kernels' defaults for bf16 inputs)": {"ddelta_in_update", "W"},
    "all three one term": {"dS_in_ddelta", "ddelta_in_update", "do_in_update"},
    "all one term, W too": {"dS_in_ddelta", "ddelta_in_update", "do_in_update", "W"},
}


def backward_state_pass(q, k, v, g, beta, do, dht, one_term: set[str] | None):
    """dh0 and dDelta [heads, T, V] from the reverse pass, chunk quantities as in `forward`."""
    heads, seq_len, key_dim = q.shape
    scale = key_dim**-0.5
    rq = torch.rsqrt((q * q).sum(-1) + 1e-6)
    rk = torch.rsqrt((k * k).sum(-1) + 1e-6)
    eye = torch.eye(CHUNK, dtype=torch.float64)
    dS = dht.clone()
    ddelta_all = torch.empty_like(v)
    starts = list(range(0, seq_len, CHUNK))
    for t0 in reversed(starts):
        sl = slice(t0, min(t0 + CHUNK, seq_len))
        n = sl.stop - sl.start
        qc, kc, bc, doc = q[:, sl], k[:, sl], beta[:, sl], do[:, sl]
        gam = g[:, sl].cumsum(-1)
        diff = gam[:, :, None] - gam[:, None, :]
        minus_inf = torch.tensor(float("-inf"), dtype=torch.float64)
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool), -1)
        A = (kc @ kc.transpose(1, 2)) * (bc * rk[:, sl])[:, :, None] * rk[:, None, sl]
        A = A * torch.where(lower, diff.clamp(max=0.0), minus_inf).exp()
        if one_term is not None and one_term & {"T_doubling", "T_f16"}:
            T = unit_lower_inverse(f32(A, one_term), one_term)
        else:
            T = torch.linalg.solve_triangular(eye[:n, :n] + A, eye[:n, :n].expand(heads, n, n), upper=False,
                                              unitriangular=True)
        W = operand((T * (bc * gam.exp() * rk[:, sl])[:, None, :]) @ kc, "W", one_term)
        incl = torch.tril(torch.ones(n, n, dtype=torch.bool))
        P = (qc @ kc.transpose(1, 2)) * (scale * rq[:, sl])[:, :, None] * rk[:, None, sl]
        P = P * torch.where(incl, diff.clamp(max=0.0), minus_inf).exp()
        local = f32(P.transpose(1, 2) @ doc, one_term)  # P^T dO, precomputed in float32
        kscale = rk[:, sl] * (gam[:, -1:] - gam).exp()
        qscale = scale * rq[:, sl] * gam.exp()
        ddelta = f32(local + kscale[:, :, None] * (kc @ operand(dS, "dS_in_ddelta", one_term)), one_term)
        ddelta_all[:, sl] = ddelta
        dS = gam[:, -1:, None].exp() * dS + qc.transpose(1, 2) @ operand(qscale[:, :, None] * doc, "do_in_update", one_term)
        dS = f32(dS - W.transpose(1, 2) @ operand(ddelta, "ddelta_in_update", one_term), one_term)
    return dS, ddelta_all


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="0,1,2,3,4,5", help="indices into CASES")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="", help="run only the forward variants whose names contain this text "
                        "(and the first, for comparison); skips the reverse pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [CASES[int(i)] for i in args.cases.split(",")]
    first = next(iter(VARIANTS))
    variants = {name: one_term for name, one_term in VARIANTS.items() if name == first or args.variants in name}
    results = {}
    for name, kwargs in cases:
        inputs = make_inputs(**kwargs)
        ref_o, ref_s = forward(*inputs, None)
        for variant, one_term in variants.items():
            o, s = forward(*inputs, one_term)
            results[(variant, name)] = (rel(o, ref_o), rel(s, ref_s))
            print(f"{name} | {variant}: o {results[(variant, name)][0]:.2e}, final state {results[(variant, name)][1]:.2e}",
                  flush=True)
    for name, kwargs in cases if not args.variants else []:
        q, k, v, g, beta, h0 = make_inputs(**kwargs)
        gen = torch.Generator().manual_seed(1)
        do = bf16(torch.randn(v.shape, generator=gen))
        dht = torch.randn(h0.shape, generator=gen).double()
        ref_dh0, ref_dd = backward_state_pass(q, k, v, g, beta, do, dht, None)
        for variant, one_term in BACKWARD_VARIANTS.items():
            dh0, dd = backward_state_pass(q, k, v, g, beta, do, dht, one_term)
            results[("bwd " + variant, name)] = (rel(dd, ref_dd), rel(dh0, ref_dh0))
            print(f"{name} | bwd {variant}: dDelta {rel(dd, ref_dd):.2e}, dh0 {rel(dh0, ref_dh0):.2e}", flush=True)
    _print_table("Forward: relative error against the unrounded algorithm in float64 (o rounded to bf16 / final state)",
                 variants, "", cases, results)
    if not args.variants:
        _print_table("Reverse state pass: relative error of dDelta / dh0", BACKWARD_VARIANTS, "bwd ", cases, results)


def _print_table(title: str, variants: dict, prefix: str, cases: list, results: dict) -> None:
    print(f"\n{title}:\n")
    print("| variant | " + " | ".join(name for name, _ in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for variant in variants:
        cells = [f"{results[(prefix + variant, name)][0]:.1e} / {results[(prefix + variant, name)][1]:.1e}" for name, _ in cases]
        print(f"| {variant} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
