"""PNG figures of scaling-law fits: loss vs compute, savings factor vs N, and residuals.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here touches the global backend
or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from hybridlm.scaling.fit import ArchitectureAnalysis, savings_point

MARKERS = "osD^v<>pXh*"


def _figure(n_panels: int, panel_size: tuple[float, float] = (4.6, 3.6), max_columns: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(n_panels, max_columns)
    rows = math.ceil(n_panels / columns)
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[n_panels:]:
        unused.set_visible(False)
    return figure, axes[:n_panels]


def plot_loss_vs_compute(analyses: dict[str, ArchitectureAnalysis], path: str | Path) -> Path:
    """One panel per architecture: runs (C = 6ND, loss) coloured by N, the fitted curve of each size, and the
    compute-optimal frontier; a last panel overlays the frontiers of all architectures."""
    from matplotlib import cm
    from matplotlib.colors import LogNorm

    all_N = np.concatenate([a.data.N for a in analyses.values()])
    all_C = np.concatenate([a.data.compute for a in analyses.values()])
    norm = LogNorm(all_N.min(), all_N.max() if all_N.max() > all_N.min() else all_N.min() * 10)
    colormap = cm.viridis
    frontier_C = np.geomspace(all_C.min() / 2, all_C.max() * 10, 100)
    figure, axes = _figure(len(analyses) + 1)
    for axis, analysis in zip(axes, analyses.values()):
        data, fit = analysis.data, analysis.fit
        for size in data.sizes:
            at_size = data.N == size
            C = np.geomspace(data.compute[at_size].min() / 1.5, data.compute[at_size].max() * 1.5, 50)
            axis.plot(C, fit.predict(size, C / (6 * size)), color=colormap(norm(size)), linewidth=1)
        scatter = axis.scatter(data.compute, data.loss, c=data.N, cmap=colormap, norm=norm, s=18, zorder=3,
                               edgecolors="black", linewidths=0.3)
        axis.plot(frontier_C, [fit.compute_optimal(C).loss for C in frontier_C], "k--", linewidth=1,
                  label="compute-optimal")
        axis.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss",
                 title=f"{analysis.arch}: E={fit.E:.3g}, alpha={fit.alpha:.3g}, beta={fit.beta:.3g}")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both")
    figure.colorbar(scatter, ax=list(axes[:-1]), label="N (parameters)")
    overlay = axes[-1]
    for analysis in analyses.values():
        overlay.plot(frontier_C, [analysis.fit.compute_optimal(C).loss for C in frontier_C], label=analysis.arch)
    overlay.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss", title="compute-optimal frontiers")
    overlay.legend(fontsize=7)
    overlay.grid(alpha=0.3, which="both")
    return _save(figure, path)


def plot_savings(analyses: dict[str, ArchitectureAnalysis], reference: str, target_losses: Sequence[float],
                 sizes: Sequence[float], path: str | Path, level: float = 0.95) -> Path:
    """One panel per non-reference architecture: savings factor D_ref/D_arch vs N for each target loss, with the
    paired-bootstrap percentile band (see fit.savings_point). Where the factor or its interval is undefined (a fit
    cannot reach the loss) the line or band breaks."""
    others = [a for a in analyses.values() if a.arch != reference]
    if reference not in analyses or not others:
        raise ValueError(f"the savings plot needs the reference {reference!r} and at least one other architecture; "
                         f"got {', '.join(analyses)}")
    ref = analyses[reference]
    grid = np.geomspace(min(sizes), max(sizes), 60)
    figure, axes = _figure(len(others))
    for axis, analysis in zip(axes, others):
        for index, target in enumerate(target_losses):
            color = f"C{index}"
            factor, low, high = (np.full(grid.size, np.nan) for _ in range(3))
            for i, N in enumerate(grid):
                point = savings_point(ref, analysis, N, target, level)
                # NaN (undefined) only breaks the plotted line and band here; tables and JSON say "undefined".
                if point.factor is not None:
                    factor[i] = point.factor
                if point.interval is not None:
                    low[i], high[i] = point.interval
            axis.plot(grid, factor, color=color, label=f"L* = {target:.3g}")
            axis.fill_between(grid, low, high, color=color, alpha=0.2, linewidth=0)
        axis.axhline(1.0, color="black", linewidth=0.8)
        for N in sizes:
            axis.axvline(N, color="grey", linewidth=0.4, alpha=0.5)
        # Log scale: the factor diverges where the reference's floor E + A/N^alpha approaches L*.
        axis.set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel=f"D_{reference} / D_{analysis.arch}",
                 title=f"{analysis.arch} vs {reference} ({level:.0%} band)")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both")
    return _save(figure, path)


def plot_residuals(analyses: dict[str, ArchitectureAnalysis], path: str | Path) -> Path:
    """Relative residual (pred - actual) / actual of every run, in percent, against N and against D."""
    figure, (by_N, by_D) = _figure(2, max_columns=2)
    for index, analysis in enumerate(analyses.values()):
        data = analysis.data
        residual = 100 * (analysis.fit.predict(data.N, data.D) - data.loss) / data.loss
        style = dict(marker=MARKERS[index % len(MARKERS)], color=f"C{index}", s=16, label=analysis.arch, alpha=0.8)
        by_N.scatter(data.N, residual, **style)
        by_D.scatter(data.D, residual, **style)
    for axis, name in ((by_N, "N (parameters)"), (by_D, "D (tokens)")):
        axis.axhline(0, color="black", linewidth=0.8)
        for bound in (-1, 1):
            axis.axhline(bound, color="grey", linestyle=":", linewidth=0.8)
        axis.set(xscale="log", xlabel=name, ylabel="(pred - actual) / actual (%)", title=f"residuals vs {name[0]}")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3, which="both")
    return _save(figure, path)


def write_plots(analyses: dict[str, ArchitectureAnalysis], directory: str | Path, *, reference: str | None = None,
                target_losses: Sequence[float] = (), sizes: Sequence[float] = ()) -> list[Path]:
    """Write loss_vs_compute.png, residuals.png and (with a reference, another architecture, target losses and
    sizes) savings_vs_N.png into `directory`, creating it. Returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_loss_vs_compute(analyses, directory / "loss_vs_compute.png"),
             plot_residuals(analyses, directory / "residuals.png")]
    if reference is not None and len(analyses) > 1 and len(target_losses) and len(sizes):
        paths.append(plot_savings(analyses, reference, target_losses, sizes, directory / "savings_vs_N.png"))
    return paths


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
