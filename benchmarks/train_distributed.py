"""Train the same config with torchrun on 1, 2, ... processes and compare losses and throughput.

    python benchmarks/train_distributed.py --nproc 1 2 --out runs/dist -- \
        --set model.preset=hybrid-1b --set data.seq_len=2048 --set data.batch_size=16 --set trainer.steps=30

Everything after `--` goes to `hybridlm train` unchanged. Each run writes RUN_DIR = OUT/nproc{N}; the
table compares each step's train loss with the 1-process run (same global batch, so the same
numbers up to reduction order and bf16 rounding) and gives the median tokens/s after warm-up
(the first `--warmup` logged steps are left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to run (default 1 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"), help="parent of the run directories")
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out of the tokens/s median")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for `hybridlm train`")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    runs = {}
    for nproc in args.nproc:
        run_dir = args.out / f"nproc{nproc}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "hybridlm", "train", *train_args, "--run-dir", str(run_dir), "--no-progress"]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, env=dict(os.environ))
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            print(f"nproc {nproc} failed with exit code {completed.returncode}", file=sys.stderr)
            return completed.returncode
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        runs[nproc] = (records, wall)

    base_records = runs[args.nproc[0]][0]
    base = {r["step"]: r["train_loss"] for r in base_records if "train_loss" in r}
    print()
    print("| processes | wall s | median tokens/s | tokens/s per process | peak GPU memory GiB | "
          f"final train loss | max rel. loss diff vs {args.nproc[0]} | final val loss |")
    print("|---|---|---|---|---|---|---|---|")
    for nproc, (records, wall) in runs.items():
        logged = [r for r in records if "tokens_per_s" in r]
        rates = [r["tokens_per_s"] for r in logged[args.warmup:]] or [r["tokens_per_s"] for r in logged]
        rate = statistics.median(rates)
        diffs = [abs(r["train_loss"] - base[r["step"]]) / abs(base[r["step"]]) for r in logged if r["step"] in base]
        memory = max((r.get("max_memory_gib", 0.0) for r in records), default=0.0)
        val = [r["val_loss"] for r in records if "val_loss" in r]
        print(f"| {nproc} | {wall:.0f} | {rate:,.0f} | {rate / nproc:,.0f} | {memory:.1f} | {logged[-1]['train_loss']:.4f} | "
              f"{max(diffs):.2e} | {val[-1] if val else float('nan'):.4f} |")
    print()
    print("| step | " + " | ".join(f"loss (nproc {n})" for n in runs) + " |")
    print("|---|" + "---|" * len(runs))
    steps = [r["step"] for r in base_records if "train_loss" in r]
    by_run = {n: {r["step"]: r["train_loss"] for r in records if "train_loss" in r} for n, (records, _) in runs.items()}
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{by_run[n].get(step, float('nan')):.4f}" for n in runs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
