"""Flex attention (BlockMask) against SDPA with a dense boolean mask: accuracy and speed on a GPU.

    python benchmarks/attention_gpu.py [--batch 2] [--seq-len 8192] [--heads 16] [--head-dim 128]

The masks our models build for training: a sliding window of 4096 (Olmo 3's local layers), packed
documents (lengths drawn at random, 8 per row on average), and both. bf16 q, k, v; the reference is
SDPA in float32 with the same dense mask. Prints, per mask and implementation, the relative error
||x - ref|| / ||ref|| of the output and of dq, dk, dv, and the median forward and forward+backward
times (triton.testing.do_bench); PyTorch's flash attention with a plain causal mask is timed too.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from hybridlm.nn.attention import build_attention_mask, build_block_mask, flex_attention_fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_doc_ids(batch: int, seq_len: int, docs_per_row: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.rand(batch, seq_len, generator=gen) < docs_per_row / seq_len
    starts[:, 0] = False
    return starts.long().cumsum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    b, t, h, d = args.batch, args.seq_len, args.heads, args.head_dim
    q, k, v = (torch.randn(b, h, t, d, generator=gen).to(device, torch.bfloat16).requires_grad_() for _ in range(3))
    do = torch.randn(b, h, t, d, generator=gen).to(device, torch.bfloat16)
    doc_ids = random_doc_ids(b, t, 8, gen).to(device)
    scale = d**-0.5
    flex = flex_attention_fn(True)
    rows = []
    for name, docs, window in [("window", None, args.window), ("documents", doc_ids, None), ("window+documents", doc_ids, args.window)]:
        dense = build_attention_mask(query_length=t, key_length=t, doc_ids=docs, sliding_window=window, device=device)
        block = build_block_mask(batch=b, seq_len=t, doc_ids=docs, sliding_window=window, device=device)
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=dense, scale=scale)
        ref_grads = torch.autograd.grad(ref, leaves, do.float())
        impls = {
            "sdpa dense mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale),
            "flex block mask": lambda: flex(q, k, v, block_mask=block, scale=scale),
        }
        for label, fn in impls.items():
            out = fn()
            grads = torch.autograd.grad(out, (q, k, v), do)
            errors = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, ref_grads)]
            fwd = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            fwd_bwd = triton.testing.do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), do), warmup=25, rep=100,
                                              return_mode="median")
            rows.append((name, label, errors, fwd, fwd_bwd))
            print(rows[-1], flush=True)
        del dense, block
        torch.cuda.empty_cache()
    causal = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
    rows.append(("causal only", "sdpa flash", [float("nan")] * 4,
                 triton.testing.do_bench(causal, warmup=25, rep=100, return_mode="median"),
                 triton.testing.do_bench(lambda: torch.autograd.grad(causal(), (q, k, v), do), warmup=25, rep=100,
                                         return_mode="median")))
    print(f"\n(B, T, H, d) = ({b}, {t}, {h}, {d}), bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| mask | implementation | o | dq | dk | dv | fwd ms | fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, errors, fwd, fwd_bwd in rows:
        print(f"| {name} | {label} | " + " | ".join(f"{e:.1e}" for e in errors) + f" | {fwd:.2f} | {fwd_bwd:.2f} |")


if __name__ == "__main__":
    main()
