"""`hybridlm tasks ...`: the synthetic expressivity tasks.

    hybridlm tasks list
    hybridlm tasks sample TASK --n N --seed S [--set knob=value ...] [--tokens]
    hybridlm tasks run --grid {cpu,gpu} --out DIR [--tasks ...] [--archs ...] [--seeds ...] [--steps N]

Each subcommand is one `add_<name>(subcommands)` function listed in SUBCOMMANDS: it adds its parser and
sets `func` (a callable taking the parsed arguments and returning an exit code).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks",
        help="list and sample the synthetic expressivity tasks",
        description="Synthetic expressivity tasks (parity, word problems, MQAR, state-based recall, ...).",
    )
    subcommands = parser.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)


def parse_knob_settings(task_name: str, settings: list[str]) -> dict:
    """`["n=4:16", "mode=swap"]` -> validated knob values for `task_name` (ValueError on bad input)."""
    from hybridlm.tasks import task_class

    cls = task_class(task_name)
    knobs = {}
    for setting in settings:
        name, separator, value = setting.partition("=")
        if not separator:
            raise ValueError(f"--set expects knob=value (e.g. n=4:16); got {setting!r}")
        knobs[name.strip()] = cls.knob(name.strip()).parse(value)
    return knobs


# list -------------------------------------------------------------------------------------------------------
def add_list(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("list", help="the tasks with their knobs, defaults and valid values")
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from hybridlm.tasks import TASKS

    for name, cls in TASKS.items():
        task = cls()
        print(f"{name}: {cls.summary}")
        print(f"  vocabulary: {task.vocab_size} tokens at the defaults")
        for spec in cls.knob_specs:
            marker = " [length]" if spec.length else ""
            print(f"  {spec.name} = {spec.format(task.knobs[spec.name])}{marker}: {spec.help}; "
                  f"valid: {spec.valid_values()}")
        print()
    print("[length]: a size knob that `length_split` grows for the longer-than-training test set.")
    return 0


# sample -----------------------------------------------------------------------------------------------------
def add_sample(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("sample", help="print examples of a task in text (and token) form")
    parser.add_argument("task", help="task name (see `hybridlm tasks list`)")
    parser.add_argument("--n", type=int, default=3, help="number of examples (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KNOB=VALUE",
                        help="set a knob, e.g. --set n=4:16 --set mode=permute (repeatable)")
    parser.add_argument("--tokens", action="store_true", help="also print the token form")
    parser.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from hybridlm.tasks import task_class
    from hybridlm.tasks.base import show_tokens

    try:
        task = task_class(args.task)(**parse_knob_settings(args.task, args.settings))
        examples = task.dataset(args.n, args.seed)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    print(f"# {task!r}, seed {args.seed}, vocabulary {task.vocab_size} tokens")
    for index, example in enumerate(examples):
        sizes = ", ".join(f"{key}={value}" for key, value in example.size.items())
        print(f"\n--- example {index} ({sizes}) ---")
        print(example.text)
        print(f"answer: {example.answer_text}")
        if args.tokens:
            tokens = task.decode(example.input_ids)
            supervised = [f"{t}: {show_tokens([tokens[t]])} -> {show_tokens(task.decode([example.targets[t]]))}"
                          for t in example.supervised_positions]
            print(f"tokens ({len(tokens)}): {show_tokens(tokens)}")
            print(f"supervised (position: token read -> target): {', '.join(supervised)}")
            print(f"input_ids: {example.input_ids}")
            print(f"targets: {example.targets}")
    return 0


# run --------------------------------------------------------------------------------------------------------
def add_run(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "run",
        help="train matched-size transformer / GDN / hybrid models on the tasks (expressivity experiments)",
        description="Train small models of matched parameter count (transformer, GDN with beta in (0,1) and "
        "(0,2), 3:1 and 1:1 hybrids) on each task of a grid over difficulties and seeds; write results.json, "
        "tables.md and accuracy plots to --out. Runs already in results.json are skipped (resume).",
    )
    parser.add_argument("--grid", required=True, choices=["cpu", "gpu"],
                        help="cpu: about 30 min on 2 cores; gpu: the larger grid, for one GPU")
    parser.add_argument("--out", required=True, help="output directory (results.json, tables.md, PNG plots)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="only these task settings of the grid")
    parser.add_argument("--archs", nargs="+", metavar="ARCH", help="only these architectures")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="these seeds instead of the grid's")
    parser.add_argument("--steps", type=int, help="optimizer steps per run instead of the grid's")
    parser.add_argument("--workers", type=int, help="runs in parallel (processes); default: the grid's")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs, parameter counts and the measured FLOPs / H200 time estimate; train nothing")
    parser.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    from hybridlm.tasks.experiments import get_grid, run_grid

    try:
        grid = get_grid(args.grid).select(tasks=args.tasks, archs=args.archs, seeds=args.seeds, steps=args.steps)
        if args.dry_run:
            from hybridlm.tasks.experiment_estimate import print_estimate

            print_estimate(grid)
            return 0
        run_grid(grid, args.out, device=args.device, workers=args.workers)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    return 0


SUBCOMMANDS = [add_list, add_sample, add_run]
