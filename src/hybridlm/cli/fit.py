"""`hybridlm fit RESULTS.csv`: Chinchilla scaling-law fits per architecture, with intervals, cross-validation,
compute-optimal allocations and token-savings factors against a reference architecture."""

from __future__ import annotations

import argparse
import sys

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def count(text: str) -> float:
    """A positive count such as 7e9, 7B, 760M or 1.5T (argparse type)."""
    text = text.strip()
    scale = SUFFIXES.get(text[-1:].upper(), 1.0) if text[-1:].isalpha() else 1.0
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; expected e.g. 7e9, 7B, 760M or 1.5T") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite positive number")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="fit scaling laws L(N, D) = E + A/N^alpha + B/D^beta to ladder results",
        description="Fit L(N, D) = E + A/N^alpha + B/D^beta per architecture (Huber loss, delta 1e-3, on log "
        "residuals; L-BFGS-B from a grid of starts) to a CSV with columns arch,N,D,loss (N non-embedding "
        "parameters, D tokens; extra columns are ignored). Prints the parameters with bootstrap 95% intervals, "
        "leave-one-size-out and rollout errors, compute-optimal allocations (C = 6ND) and, with --ref, the "
        "token-savings factor D_ref/D_arch at equal loss. Needs scipy: pip install 'hybridlm[scaling]'.",
    )
    parser.add_argument("results", help="CSV with columns arch,N,D,loss")
    parser.add_argument("--ref", metavar="ARCH", help="reference architecture for token-savings factors")
    parser.add_argument("--json", metavar="OUT", help="write {arch: {E, A, alpha, B, beta, ci, loso_error, "
                        "compute_optimal, savings, ...}} to this file")
    parser.add_argument("--plots", metavar="DIR", help="write loss_vs_compute.png, residuals.png and "
                        "savings_vs_N.png (with --ref) into this directory")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N",
                        help="bootstrap refits per architecture (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--target-loss", type=positive_float, nargs="+", metavar="L",
                        help="target losses for the savings factor (default: a few every architecture can reach)")
    parser.add_argument("--sizes", type=count, nargs="+", metavar="N",
                        help="sizes for the savings factor, e.g. 190M 1B 7B (default: the reference's sizes plus "
                        "1B, 7B, 70B)")
    parser.add_argument("--compute", type=positive_float, nargs="+", metavar="C",
                        help="compute budgets in FLOPs for the compute-optimal table (default: five powers of ten "
                        "from the smallest run to 1000x the largest)")
    parser.add_argument("--delta", type=positive_float, default=1e-3, help="Huber delta (default 1e-3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, ImportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from hybridlm.scaling import fit as scaling

    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    data = scaling.load_results_csv(args.results)
    if args.ref is not None and args.ref not in data:
        raise ValueError(f"--ref {args.ref!r} is not an architecture in {args.results}; expected one of: "
                         f"{', '.join(data)}")
    analyses = scaling.analyse(data, n_bootstrap=args.bootstrap, seed=args.seed, delta=args.delta)
    budgets = args.compute or scaling.default_compute_budgets(data)
    savings, targets, sizes = [], [], []
    if args.ref is not None:
        targets = args.target_loss or scaling.default_target_losses(analyses)
        sizes = args.sizes or scaling.default_savings_sizes(data[args.ref])
        savings = scaling.savings_table(analyses, args.ref, sizes, targets)

    print_parameters(analyses)
    print_validation(analyses)
    print_compute_optimal(analyses, budgets, args.ref)
    if args.ref is None:
        print("\n(no --ref given: token-savings factors not computed)")
    elif len(analyses) == 1:
        print(f"\n(only one architecture: no token-savings factors against {args.ref!r})")
    else:
        print_savings(savings, args.ref)

    if args.json:
        report = scaling.report_json(analyses, reference=args.ref, savings=savings, compute_budgets=budgets)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.json}")
    if args.plots:
        from hybridlm.scaling.plots import write_plots

        for path in write_plots(analyses, args.plots, reference=args.ref, target_losses=targets, sizes=sizes):
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def human(value: float | None, digits: int = 3) -> str:
    """1.28e9 -> '1.28B'; None -> 'undefined'."""
    if value is None:
        return "undefined"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale and abs(value) < 1e15:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def with_interval(value: float, interval: tuple[float, float] | None, digits: int = 4) -> str:
    if interval is None:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}g} [{interval[0]:.{digits}g}, {interval[1]:.{digits}g}]"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_parameters(analyses) -> None:
    rows = []
    for analysis in analyses.values():
        fit, intervals = analysis.fit, analysis.bootstrap.intervals()
        rows.append([analysis.arch, str(fit.n_points), str(analysis.data.sizes.size)]
                    + [with_interval(getattr(fit, name), intervals[name]) for name in intervals]
                    + [f"{fit.r2:.5f}"])
    n_bootstrap = len(next(iter(analyses.values())).bootstrap.fits)
    print_table(f"L(N, D) = E + A/N^alpha + B/D^beta: fitted parameters [95% bootstrap interval, {n_bootstrap} refits]",
                ["arch", "points", "sizes", "E", "A", "alpha", "B", "beta", "a_opt", "b_opt", "R^2 (loss)"], rows)


def print_validation(analyses) -> None:
    rows, notes = [], []
    for analysis in analyses.values():
        if analysis.validation_note:
            notes.append(f"{analysis.arch}: not available: {analysis.validation_note}")
            continue
        for held in analysis.held_out:
            rows.append([analysis.arch, f"leave out {human(held.held_out_N)}", str(held.n_points),
                         f"{len(held.train_sizes)} sizes", f"{100 * held.mean_abs_rel_error:.3f}%"])
        mean = sum(h.mean_abs_rel_error for h in analysis.held_out) / len(analysis.held_out)
        rows.append([analysis.arch, "mean over sizes", "", "", f"{100 * mean:.3f}%"])
        roll = analysis.rollout
        rows.append([analysis.arch, f"rollout: predict {human(roll.held_out_N)}", str(roll.n_points),
                     f"<= {human(roll.train_sizes[-1])}", f"{100 * roll.mean_abs_rel_error:.3f}%"])
    print_table("Cross-validation: mean absolute relative error of the predicted loss on held-out sizes",
                ["arch", "held out", "points", "trained on", "error"], rows)
    for note in notes:
        print(note)


def print_compute_optimal(analyses, budgets, reference) -> None:
    rows = []
    for C in budgets:
        ref_loss = analyses[reference].fit.compute_optimal(C).loss if reference else None
        for analysis in analyses.values():
            point = analysis.fit.compute_optimal(C)
            versus = "" if reference is None else f"{point.loss - ref_loss:+.4f}"
            rows.append([f"{C:.3g}", analysis.arch, human(point.N), human(point.D), f"{point.D / point.N:.1f}",
                         f"{point.loss:.4f}"] + ([versus] if reference else []))
    headers = ["C (FLOPs)", "arch", "N*", "D*", "D*/N*", "loss"] + ([f"vs {reference}"] if reference else [])
    print_table("Compute-optimal allocation (C = 6ND; N* = G (C/6)^a_opt, D* = (C/6)^b_opt / G)", headers, rows)


def print_savings(savings, reference) -> None:
    rows = []
    for point in savings:
        interval = "undefined"
        if point.interval is not None:
            interval = f"[{point.interval[0]:.3g}, {point.interval[1]:.3g}]"
        factor = "undefined" if point.factor is None else f"{point.factor:.3g}x"
        rows.append([point.arch, human(point.N), f"{point.target_loss:.4g}", human(point.tokens_ref),
                     human(point.tokens_arch), factor, interval, f"{point.n_defined}/{point.n_bootstrap}"])
    print_table(f"Token-savings factor D_{reference}(N, L*) / D_arch(N, L*) at equal loss "
                f"[95% paired-bootstrap interval; given when the factor is defined in >= 95% of the refits]",
                ["arch", "N", "L*", f"D_{reference}", "D_arch", "factor", "95% interval", "defined"], rows)
    if any(point.factor is None for point in savings):
        print("undefined: the target loss L* is at or below E + A/N^alpha of one of the fits, so that size cannot "
              "reach it with any number of tokens")
