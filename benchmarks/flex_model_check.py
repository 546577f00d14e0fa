"""Model-level check of flex attention on a GPU: packed documents and sliding windows, eager and compiled.

    python benchmarks/flex_model_check.py [--seq-len 1024] [--presets olmo3-mini hybrid-mini]

For each preset (random weights, sliding window 128, float32 parameters) and a batch of 2 rows of
packed documents (8 per row on average): the loss and every parameter gradient with attention
through flex attention's BlockMask (`attn_impl="flex"`) and through SDPA with the dense mask
(`"sdpa"`), eager and with every block compiled (`train.distributed.apply_compile`, what
`trainer.compile` does), in float32 and under bf16 autocast. Prints the relative difference of the
loss and of the concatenated gradients between flex and SDPA with the same blocks at the same
precision, and of flex's gradients against eager float32 (what bf16 and compilation themselves
cost); exits non-zero if flex and SDPA differ by more than 1e-4 in float32 or 1e-2 under bf16.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from hybridlm.models import HybridLM
from hybridlm.models.presets import get_preset
from hybridlm.train.distributed import apply_compile


def run(model, ids, labels, doc_ids, attn_impl: str, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, doc_ids=doc_ids, attn_impl=attn_impl).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--presets", nargs="+", default=["olmo3-mini", "hybrid-mini"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (slow; use tiny presets)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, ok = [], True
    for preset in args.presets:
        torch.manual_seed(0)
        config = get_preset(preset, sliding_window=128, max_seq_len=args.seq_len)
        model = HybridLM(config).to(device)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (2, args.seq_len), generator=gen).to(device)
        labels = torch.randint(0, config.vocab_size, (2, args.seq_len), generator=gen).to(device)
        starts = torch.rand(2, args.seq_len, generator=gen) < 8 / args.seq_len
        starts[:, 0] = False
        doc_ids = starts.long().cumsum(1).to(device)
        compiled = copy.deepcopy(model)
        apply_compile(compiled)
        fp32_grads = None
        for label, m in (("eager", model), ("compiled", compiled)):
            for autocast in (False, True):
                # The reference: SDPA with the same blocks (eager or compiled) at the same precision.
                ref_loss, ref_grads = run(m, ids, labels, doc_ids, "sdpa", autocast)
                if fp32_grads is None:
                    fp32_grads = ref_grads
                loss, grads = run(m, ids, labels, doc_ids, "flex", autocast)
                d_loss = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
                d_grad = ((grads - ref_grads).norm() / ref_grads.norm()).item()
                d_fp32 = ((grads - fp32_grads).norm() / fp32_grads.norm()).item()
                bound = 1e-2 if autocast else 1e-4
                passed = d_loss < bound and d_grad < bound and bool(torch.isfinite(grads).all())
                ok &= passed
                rows.append((preset, label, "bf16 autocast" if autocast else "float32", d_loss, d_grad, d_fp32, passed))
                print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nT = {args.seq_len}, 2 rows of packed documents, window 128; {name}, torch {torch.__version__}")
    print("| preset | blocks | precision | flex vs SDPA: loss | gradients | flex gradients vs eager float32 "
          "| pass |")
    print("|---|---|---|---|---|---|---|")
    for preset, label, precision, d_loss, d_grad, d_fp32, passed in rows:
        verdict = "yes" if passed else "NO"
        print(f"| {preset} | {label} | {precision} | {d_loss:.1e} | {d_grad:.1e} | {d_fp32:.1e} | {verdict} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
