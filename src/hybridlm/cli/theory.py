"""`hybridlm theory verify`: build the hand-set constructions and check them on random instances.

    hybridlm theory verify --n 10000 --m 1000 [--k 5] [--instances 2] [--seed 0] [--dtype float32]
                           [--decode-instances 1] [--only parity,tracking,bit_recall,state_recall] [--threads 1]

Prints one row per construction (layers, sizes, instances, exact answers of the forward and of the
decode path, the smallest relative logit margin, time) and exits 0 only if every answer is exact
(1 otherwise, 2 on invalid arguments).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "theory",
        help="hand-set GDN / attention constructions (parity, tracking, recall) and their verification",
        description="Constructions that set the weights of real HybridLM layers to solve expressivity tasks "
        "exactly (see hybridlm.theory).",
    )
    subcommands = parser.add_subparsers(dest="theory_command", metavar="SUBCOMMAND")
    verify = subcommands.add_parser(
        "verify",
        help="run every construction on random instances and check that all answers are exact",
        description="Build (a) parity, (b) pointer tracking, (c) bit recall and (d) state-based recall as "
        "HybridLM models with hand-set weights, run them on random task instances and print a table. "
        "Exit code 0 if every answer is exact, 1 otherwise, 2 on invalid arguments.",
    )
    verify.add_argument("--n", type=int, required=True,
                        help="swap lines of the tracking and recall programs, and bits of the parity strings")
    verify.add_argument("--m", type=int, required=True, help="bits in the list (and index range of the pointers)")
    verify.add_argument("--k", type=int, default=5, help="number of pointers (default 5, valid 2..26)")
    verify.add_argument("--instances", type=int, default=2, help="random instances per construction (default 2)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the task generators (default 0)")
    verify.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="model dtype (default float32)")
    verify.add_argument("--decode-instances", type=int, default=1,
                        help="how many instances also go through prefill + decode_step (default 1; 0 skips)")
    verify.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated subset of parity,tracking,bit_recall,state_recall")
    verify.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the chunked operator runs thousands of small ops that "
                        "gain little from more threads and slow down badly when other processes share the cores)")
    verify.set_defaults(func=run_verify)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=show_help)


def run_verify(args: argparse.Namespace) -> int:
    import os
    import platform
    import sys
    import time

    import torch

    from hybridlm.theory.verify import format_table, verify_constructions

    names = None if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.threads < 1:
        print(f"error: --threads must be >= 1; got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"# hybridlm theory verify --n {args.n} --m {args.m} --k {args.k} --instances {args.instances} "
          f"--seed {args.seed} --dtype {args.dtype} --decode-instances {args.decode_instances} "
          f"--threads {args.threads}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    try:
        results = verify_constructions(
            args.n, args.m, k=args.k, instances=args.instances, seed=args.seed, dtype=dtype, names=names,
            decode_instances=args.decode_instances, progress=lambda line: print(f"# {line}", file=sys.stderr),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    passed = all(result.passed for result in results)
    print(f"total {time.perf_counter() - start:.1f} s: "
          f"{'all answers exact' if passed else 'NOT all answers exact'}")
    return 0 if passed else 1
