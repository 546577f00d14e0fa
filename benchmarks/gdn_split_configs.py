"""Check and time one launch configuration of the "triton-split" kernels per process.

    python benchmarks/gdn_split_configs.py --label NAME --opts '{"state_bwd_block_v": 32}' [--cases 0,1,2,3]
        [--shapes 0] [--profile 1] [--barrier N]

Runs the float64 checks of `gdn_gpu.py` (cases by index: 0 grouped values T=1000 vs the token loop,
1 packed documents with extreme gates, 2 the 7B layer, 3 the 1B layer, 4 64K tokens, 5 float32
inputs with documents, 6 no decay, 7 no decay at 32K, 8 no decay at K = V = 64), then, holding
/tmp/gpu.lock so that concurrent processes time one at a time, forward and forward+backward at the
issue's shapes (indices into gdn_gpu.ISSUE_SHAPES) and a per-kernel profile at the first; prints one
SUMMARY line of JSON. Start several in the background, one per configuration: they compile and
check in parallel, and a configuration that faults (which ends its CUDA context) takes only its own
process down. `DISABLE_MMA_V3=1` in a process's environment selects mma.sync instead of wgmma.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gdn_gpu as G  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--opts", default="{}", help="JSON of chunk_split.KernelOptions fields")
p.add_argument("--label", default="x")
p.add_argument("--cases", default="0,1,2,3")
p.add_argument("--profile", type=int, default=1)
p.add_argument("--shapes", default="0")
p.add_argument("--barrier", type=int, default=0,
               help="wait, after the checks, until this many processes (this one included) have finished theirs")
a = p.parse_args()
G.DEVICE = "cuda"
G._DEFAULTS.update(json.loads(a.opts))
G.RUN_IMPLS[:] = ["triton-split"]
cases_all = [
    ("gva T=1000 naive", dict(batch=2, seq_len=1000, heads=2, value_heads=4, key_dim=96, value_dim=192, reference="naive")),
    ("docs+extreme", dict(batch=1, seq_len=4096, heads=4, value_heads=4, key_dim=128, value_dim=128, gates="extreme", cu=[0, 1, 300, 300, 1000, 4096])),
    ("7B T=8191", dict(batch=1, seq_len=8191, heads=30, value_heads=30, key_dim=96, value_dim=192)),
    ("1B T=4096", dict(batch=2, seq_len=4096, heads=16, value_heads=16, key_dim=128, value_dim=256, with_state=False)),
    ("64K", dict(batch=1, seq_len=65536, heads=4, value_heads=4, key_dim=128, value_dim=256)),
    ("fp32 docs", dict(batch=1, seq_len=1000, heads=2, value_heads=4, key_dim=96, value_dim=192, cu=[0, 300, 1000],
                       dtype=torch.float32)),
    ("no decay", dict(batch=1, seq_len=4096, heads=2, value_heads=4, key_dim=96, value_dim=192, gates="none")),
    ("no decay 32K", dict(batch=1, seq_len=32768, heads=2, value_heads=4, key_dim=96, value_dim=192, gates="none")),
    ("no decay K=V=64 16K", dict(batch=1, seq_len=16384, heads=2, value_heads=2, key_dim=64, value_dim=64, gates="none")),
]


def _mark() -> None:
    open(f"/tmp/gdn_split_barrier.{a.label}", "w").close()


if a.barrier:
    atexit.register(_mark)
res = {"label": a.label, "opts": a.opts, "worst": 0.0, "finite": True}
t0 = time.time()
for i in map(int, a.cases.split(",")):
    name, kw = cases_all[i]
    r = G.check_case(name, **kw)["triton-split"]
    res["worst"] = max(res["worst"], r["worst"]); res["finite"] &= r["finite"]
    torch.cuda.empty_cache()
res["check_s"] = round(time.time() - t0, 1)
# Timing must not overlap other processes' checks: with --barrier N, each process marks its checks
# done (a process whose checks raise marks on exit) and waits up to 10 minutes for N marks. Remove
# /tmp/gdn_split_barrier.* before starting a group.
if a.barrier:
    _mark()
    deadline = time.time() + 600
    while len([f for f in os.listdir("/tmp") if f.startswith("gdn_split_barrier.")]) < a.barrier and time.time() < deadline:
        time.sleep(0.5)
with open("/tmp/gpu.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for si in map(int, filter(None, a.shapes.split(","))):
        shape = G.ISSUE_SHAPES[si]
        rows = []
        G._time_chunked(shape, rows)
        res[f"fwd{si}"] = rows[0].get("fwd_ms"); res[f"fb{si}"] = rows[0].get("fwd_bwd_ms")
    if a.profile:
        G.set_options()
        prof = G.profile_kernels(*G.ISSUE_SHAPES[0])
        res["prof"] = {r["kernel"].replace("_kernel", ""): round(r["ms_per_step"], 3) for r in prof if r["ms_per_step"] > 0.02}
print("SUMMARY " + json.dumps(res), flush=True)
