"""One cpu-grid run of mqar num_pairs=2 (seed 0) with another learning rate, printing exact-match and per-position accuracy.

    python docs/results/expressivity/lr_check.py ARCH LR STEPS     # e.g. transformer 1e-3 1000
"""
import dataclasses, sys, torch
torch.set_num_threads(1)
from hybridlm.tasks.experiments import get_grid, plan_runs, train_run
g = get_grid("cpu").select(tasks=["mqar"], archs=[sys.argv[1]], seeds=[0], steps=int(sys.argv[3]))
g = g.replace(recipe=dataclasses.replace(g.recipe, lr=float(sys.argv[2])))
spec = plan_runs(g)[0]
r = train_run(spec, "cpu")
print(sys.argv[1:], "loss %.3f id %.3f pos %.3f" % (r["train_loss"], r["id_accuracy"], r["id_position_accuracy"]), flush=True)
