"""`hybridlm train [CONFIG.yaml] [--set KEY=VALUE ...] [--run-dir DIR] [--resume]`.

With no arguments: trains a small hybrid (preset hybrid-mini) on the embedded corpus (the Python
standard library, prepared on first use) on CPU in a few minutes, then prints a sample from it.
On GPUs: `torchrun --nproc_per_node N -m hybridlm train CONFIG.yaml` shards the model with FSDP2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_RUNS_ROOT = Path("runs")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (with no arguments: a small hybrid on the embedded corpus, on CPU)",
        description="Train a hybrid GDN / attention language model. The config (model, data, optimizer, "
        "schedule, trainer sections; see configs/) is read from CONFIG.yaml (default: the built-in small CPU "
        "run) and overridden by --set section.key=value. The run directory gets config.yaml, metrics.jsonl, "
        "loss_curve.png, tokenizer.json and checkpoints/. Under torchrun the model is sharded with FSDP2.",
    )
    parser.add_argument("config", nargs="?", help="a YAML training config (default: built-in small CPU run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=1e-3 --set trainer.steps=100 "
                        "(repeatable; values are YAML)")
    parser.add_argument("--run-dir", type=Path, help="where the run writes (default: runs/NAME-TIMESTAMP; "
                        "with --resume: the newest runs/NAME-*)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest complete checkpoint, with its saved "
                        "config.yaml (plus any --set overrides, e.g. a larger trainer.steps)")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from hybridlm.train import ConfigError, TrainConfig, TrainingError, train
    from hybridlm.train.checkpoint import CheckpointWriteError, list_checkpoints
    from hybridlm.train.trainer import CONFIG_FILE

    name = Path(args.config).stem if args.config else "default"
    run_dir = args.run_dir
    try:
        if args.resume:
            run_dir = run_dir or _newest_run(name)
            if run_dir is None:
                raise ConfigError(f"--resume: no run directory given and none named {DEFAULT_RUNS_ROOT}/{name}-* exists; "
                                  "pass --run-dir DIR")
            config_path = args.config or (run_dir / CONFIG_FILE if (run_dir / CONFIG_FILE).is_file() else None)
            config = TrainConfig.from_yaml(config_path, args.overrides)
        else:
            config = TrainConfig.from_yaml(args.config, args.overrides)
            run_dir = run_dir or DEFAULT_RUNS_ROOT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if list_checkpoints(run_dir):
                raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, or "
                                  "choose another --run-dir")
        result = train(config, run_dir, resume=args.resume, progress=False if args.no_progress else None)
    except (ConfigError, TrainingError, CheckpointWriteError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    print()
    print(f"run directory: {result.run_dir}")
    if result.val_loss is not None:
        fell = f" (from {result.first_val_loss:.4f} at the first evaluation)" if result.first_val_loss is not None else ""
        print(f"step {result.step}: val loss {result.val_loss:.4f}{fell}, val bits per byte {result.val_bpb:.4f}")
    if result.skipped_steps:
        print(f"skipped steps: {result.skipped_steps}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"time: {result.seconds:.0f} s")
    if result.sample is not None:
        print()
        print("sample:")
        print(result.sample)
    if result.sample_error is not None:
        print(f"error: the run finished, but generating the sample from {result.checkpoint} failed: "
              f"{result.sample_error}", file=sys.stderr)
        return 1
    return 0


def _newest_run(name: str) -> Path | None:
    candidates = sorted(DEFAULT_RUNS_ROOT.glob(f"{name}-*"))
    return candidates[-1] if candidates else None
