"""`hybridlm ladder plan|run|status`: scaling-ladder plans (one training config per size and token multiplier,
following the ladder recipe with a WSD-S schedule), their runs, and the results.csv that `hybridlm fit` reads.

    hybridlm ladder plan --arch olmo3,hybrid --sizes 60M,100M,190M --multipliers 0.5,1,2,4,8 --out runs/ladder
    hybridlm ladder run runs/ladder          # or: torchrun --nproc_per_node 8 -m hybridlm ladder run runs/ladder
    hybridlm ladder estimate runs/ladder --workers 2   # time a few steps of each run, project the wall time
    hybridlm ladder status runs/ladder
    hybridlm fit runs/ladder/results.csv --ref olmo3
"""

from __future__ import annotations

import argparse
import shlex
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ladder",
        help="plan, run and check scaling ladders (WSD-S, one run per size; results.csv for `hybridlm fit`)",
        description="Scaling ladders following the Olmo Hybrid recipe: tokens = multiplier x 20 x N, batch = "
        "round(2048 * 160 * (N/108M)^(2/3)) tokens, lr = 0.0047 (N/108M)^(-1/3) / 2, beta2 0.95 for batches of "
        ">= 524,288 tokens else 0.99, warmup N tokens, WSD-S with a 10% decay at the end of each period. N is the "
        "non-embedding parameter count (LM head included) of the actual architecture.",
    )
    actions = parser.add_subparsers(dest="ladder_action", metavar="ACTION")

    plan = actions.add_parser(
        "plan",
        help="write one training config per (architecture, size, multiplier) and plan.json",
        description="Write DIR/plan.json and DIR/configs/{arch}-{size}-x{multiplier}.yaml. Each config is a "
        "standalone WSD-S training config whose periods end at the token counts of the multipliers up to its own; "
        "`ladder run` trains only the largest multiplier of each size and reads the smaller ones from its "
        "evaluations after each decay (the schedules are prefixes of one another, so this is the same training).",
    )
    plan.add_argument("--arch", required=True, help="comma-separated model families, e.g. olmo3,hybrid "
                      "(`hybridlm info --list` shows them)")
    plan.add_argument("--sizes", required=True, help="comma-separated sizes: the dolma2 ladder sizes 60M,100M,190M,"
                      "370M,600M,760M,1B or the micro sizes d16,d32,d48,d64,d80,d96,d128,d192,d256 (4 layers, head dim 16; the name is d_model)")
    plan.add_argument("--multipliers", default="0.5,1,2,4,8",
                      help="Chinchilla multiples: D = multiplier x 20 x N (default 0.5,1,2,4,8)")
    plan.add_argument("--out", required=True, help="the plan directory to write")
    plan.add_argument("--dataset", help="a prepared dataset directory, 'embedded' (stdlib corpus, 8192-token BPE) or "
                      "'embedded:VOCAB' (the same corpus with a VOCAB-token BPE, prepared if needed); default "
                      "data/dolma2-tokenized for ladder sizes, embedded:512 for micro sizes")
    plan.add_argument("--seq-len", type=int, help="sequence length (default 8192 for ladder sizes, 128 for micro)")
    plan.add_argument("--vocab-size", type=int, help="model vocabulary (default: the dataset tokenizer's, rounded up "
                      "to a multiple of 128; 100352 for ladder sizes when the dataset is not here)")
    plan.add_argument("--tokens-per-param", type=float, default=20.0, help="tokens per parameter at multiplier 1 "
                      "(default 20)")
    plan.add_argument("--decay-fraction", type=float, default=0.1, help="share of each period spent decaying "
                      "(default 0.1)")
    plan.add_argument("--eval-sequences", type=int, default=256, help="held-out sequences per evaluation (default 256)")
    plan.add_argument("--keep-last", type=int, default=0, help="checkpoints kept per run (default 0: all, i.e. the "
                      "ones before and after every decay; results come from the evaluations, not the checkpoints)")
    plan.add_argument("--batch-multiple", type=int, default=1, help="round the batch (in sequences) to a multiple of "
                      "this, e.g. the number of GPUs (default 1)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value in every config, e.g. --set trainer.compile=false (applied last)")
    plan.set_defaults(func=run_plan)

    run = actions.add_parser(
        "run",
        help="train the plan's runs (skipping finished ones) and collect results.csv",
        description="Train the largest multiplier of every (architecture, size) of the plan in DIR, one after the "
        "other, in DIR/runs/{arch}-{size}; finished runs are skipped and interrupted ones resume from their newest "
        "checkpoint. Then write DIR/results.csv (arch,N,D,loss plus extras) from the evaluations after each decay. "
        "Under torchrun every rank runs this command.",
    )
    run.add_argument("plan_dir", metavar="DIR", help="a plan directory (from `hybridlm ladder plan`)")
    run.add_argument("--only", default="", help="comma-separated run names ({arch}-{size}) to train; default all")
    run.add_argument("--workers", type=int, default=1, help="train this many runs at once, each in its own process "
                     "(default 1; on a CPU, one single-threaded worker per core trains small models fastest)")
    run.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice with one "
                     "worker, else the cores divided among the workers)")
    run.add_argument("--no-collect", action="store_true", help="do not rewrite DIR/results.csv (workers use this)")
    run.add_argument("--progress", action="store_true", help="show a progress bar instead of log lines")
    run.set_defaults(func=run_run)

    estimate = actions.add_parser(
        "estimate",
        help="time a few steps of every run and project the plan's wall time",
        description="Train a copy of each run's config for a few steps (constant learning rate, in a temporary "
        "directory), time its steps and one evaluation, and project each run's time and the wall time of "
        "`ladder run --workers W` on this machine. Run it on an idle machine: it times one run at a time.",
    )
    estimate.add_argument("plan_dir", metavar="DIR", help="a plan directory (from `hybridlm ladder plan`)")
    estimate.add_argument("--workers", type=int, default=1, help="the --workers that `ladder run` will use "
                          "(default 1)")
    estimate.add_argument("--threads", type=int, help="torch threads while timing (default: the cores divided among "
                          "the workers, as `ladder run` does)")
    estimate.add_argument("--steps", type=int, default=4, help="optimizer steps timed per run, the first left out "
                          "(default 4)")
    estimate.add_argument("--only", default="", help="comma-separated run names to time; default all")
    estimate.set_defaults(func=run_estimate)

    status = actions.add_parser("status", help="show which runs and points of a plan are done",
                                description="Show every run of the plan in DIR: its state and the loss after each "
                                "decay that has been reached.")
    status.add_argument("plan_dir", metavar="DIR", help="a plan directory")
    status.set_defaults(func=run_status)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _errors():
    from hybridlm.scaling.ladder import LadderError
    from hybridlm.train import ConfigError, TrainingError
    from hybridlm.train.checkpoint import CheckpointWriteError

    return (LadderError, ConfigError, TrainingError, CheckpointWriteError, ImportError, FileNotFoundError)


def run_plan(args: argparse.Namespace) -> int:
    from hybridlm.scaling import ladder

    try:
        plan, configs = ladder.build_plan(
            ladder.parse_list(args.arch, "--arch"),
            ladder.parse_list(args.sizes, "--sizes"),
            ladder.parse_list(args.multipliers, "--multipliers"),
            dataset=args.dataset,
            seq_len=args.seq_len,
            vocab_size=args.vocab_size,
            tokens_per_param=args.tokens_per_param,
            decay_fraction=args.decay_fraction,
            eval_sequences=args.eval_sequences,
            keep_last=args.keep_last,
            batch_multiple=args.batch_multiple,
            overrides=args.overrides,
        )
        command = "hybridlm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["ladder"] else None
        path = ladder.write_plan(plan, configs, args.out, command=command)
    except _errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_plan(plan)
    print(f"\nwrote {path} and {len(configs)} configs in {args.out}/{ladder.CONFIGS_DIR}")
    print(f"next: hybridlm ladder run {args.out}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from hybridlm.scaling import ladder

    only = [name.strip() for name in args.only.split(",") if name.strip()]
    try:
        statuses = ladder.run_ladder(args.plan_dir, only=only, workers=args.workers, threads=args.threads,
                                     collect=not args.no_collect, progress=args.progress)
    except _errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.no_collect:
        return 0
    print()
    print_status(statuses)
    print(f"\nwrote {args.plan_dir}/{ladder.RESULTS_FILE}")
    archs = list(dict.fromkeys(status.run.arch for status in statuses))
    print(f"fit with: hybridlm fit {args.plan_dir}/{ladder.RESULTS_FILE} --ref {archs[0]}")
    return 0


def run_estimate(args: argparse.Namespace) -> int:
    import os

    from hybridlm.scaling import ladder

    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    threads = args.threads
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    try:
        estimates = ladder.estimate_ladder(args.plan_dir, only=only, steps=args.steps, threads=threads)
    except _errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(estimate.seconds for estimate in estimates)
    wall = ladder.projected_wall_seconds(estimates, args.workers)
    print(f"\n{len(estimates)} runs: {total:,.0f} s of training one after another; with {args.workers} worker(s) "
          f"about {wall:,.0f} s ({wall / 60:.1f} min) of wall time, plus start-up and checkpoints, if the workers "
          "run as fast side by side as alone")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from hybridlm.scaling import ladder

    try:
        statuses = ladder.ladder_status(args.plan_dir)
    except _errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_status(statuses)
    return 0


def print_plan(plan) -> None:
    from hybridlm.cli.fit import human, print_table

    multipliers = plan.settings["multipliers"]
    rows = []
    for run in plan.runs:
        rows.append([run.name, f"{run.N:,}", f"{run.batch_sequences} x {run.seq_len}", f"{run.batch_tokens:,}",
                     f"{run.lr:.4g}", f"{run.beta2:g}", f"{run.warmup_steps:,}"]
                    + [f"{human(p.tokens)} ({p.steps:,})" for p in run.points] + [f"{run.flops:.3g}"])
    headers = (["run", "N", "batch (seqs x len)", "batch tokens", "peak lr", "beta2", "warmup steps"]
               + [f"x{m:g}: D (steps)" for m in multipliers] + ["6ND of the run"])
    print_table(f"Ladder plan: {len(plan.runs)} WSD-S runs (one per row), {len(plan.runs) * len(multipliers)} points; "
                f"dataset {plan.settings['dataset']}, vocab {plan.settings['vocab_size']}", headers, rows)
    tokens = sum(run.points[-1].tokens for run in plan.runs)
    flops = sum(run.flops for run in plan.runs)
    print(f"\ntotal: {human(tokens)} training tokens, {flops:.3g} FLOPs (6ND; attention not counted)")


def print_status(statuses) -> None:
    from hybridlm.cli.fit import human, print_table

    rows = []
    for status in statuses:
        losses = [("-" if r.loss is None else f"{r.loss:.4f}") for r in status.results]
        points = " ".join(f"x{r.point.multiplier:g}={loss}" for r, loss in zip(status.results, losses))
        rows.append([status.run.name, human(status.run.N), status.state, points])
    print_table("Ladder runs (validation loss after each decay; - : not reached yet)",
                ["run", "N", "state", "loss per multiplier"], rows)
