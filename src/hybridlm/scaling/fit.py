"""Chinchilla scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta.

N is the (non-embedding) parameter count, D the number of training tokens, L the validation loss.
The procedure follows the Olmo Hybrid analysis (paper section 7):

- Fit: Huber loss (delta = 1e-3) on log-space residuals log(pred) - log(actual), minimised with
  L-BFGS-B and an analytic gradient from several starting points; the best end point wins.
- Uncertainty: 95% percentile intervals from a bootstrap over points (resample, refit).
- Validation: leave-one-size-out error and the rollout (fit the smaller sizes, predict the largest).
- Derived: the compute-optimal allocation under C = 6 N D, and the token-savings factor
  D_ref(N, L*) / D_arch(N, L*) of one architecture against a reference at equal loss L*.

Everything here works on float64 numpy arrays. scipy is optional (`pip install 'hybridlm[scaling]'`)
and imported only where a fit runs.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PARAM_NAMES = ("E", "A", "alpha", "B", "beta")
# Quantities that get a bootstrap interval: the five parameters and the compute-optimal exponents.
INTERVAL_NAMES = PARAM_NAMES + ("a_opt", "b_opt")
CSV_COLUMNS = ("arch", "N", "D", "loss")
MIN_POINTS = len(PARAM_NAMES)
# E, A and alpha are only identifiable from the loss at three or more sizes (two sizes give two offsets for three
# unknowns); the same holds for B and beta over token counts.
MIN_DISTINCT = 3

# Exponents are searched in [1e-3, 4] (kept above 0 so that a_opt, G and D(N, L) stay finite); log E is kept above
# log(1e-8) so that log(pred) stays finite.
EXPONENT_BOUNDS = (1e-3, 4.0)
LOG_E_MIN = math.log(1e-8)
# Starting-point grid for the exponents; E, A, B follow from a linear solve at each (alpha, beta).
EXPONENT_GRID = np.arange(0.05, 2.0001, 0.05)


def _require_scipy(what: str):
    try:
        import scipy.optimize
    except ImportError:
        raise ImportError(
            f"{what} needs scipy, which is not installed; install it with: pip install 'hybridlm[scaling]'"
        ) from None
    return scipy.optimize


# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class ScalingData:
    """The runs of one architecture: N[i] parameters trained on D[i] tokens reached loss[i].

    N, D, loss: float64 arrays of shape (n,), all finite and positive.
    """

    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """The distinct N values, ascending."""
        return np.unique(self.N)

    @property
    def compute(self) -> np.ndarray:
        """Training compute C = 6 N D of each point, float64 (n,)."""
        return 6.0 * self.N * self.D


def load_results_csv(path: str | Path) -> dict[str, ScalingData]:
    """Read a results CSV with columns arch,N,D,loss (extra columns are ignored).

    Returns {arch: ScalingData} in order of first appearance. Raises ValueError naming the line and column of the
    first bad value, a missing column, or an architecture with fewer than 5 points (the fit has 5 parameters).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a CSV with columns {','.join(CSV_COLUMNS)}")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        if not header:
            raise ValueError(f"{path}: the file is empty; expected a header line with columns {','.join(CSV_COLUMNS)}")
        missing = [name for name in CSV_COLUMNS if name not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; expected a header with columns "
                f"{','.join(CSV_COLUMNS)} (extra columns are ignored), found: {','.join(header)}"
            )
        reader.fieldnames = header
        rows: dict[str, list[tuple[float, float, float, int]]] = {}
        for row in reader:
            line = reader.line_num
            if all((value or "").strip() == "" for value in row.values() if isinstance(value, str)):
                continue  # blank line
            arch = (row.get("arch") or "").strip()
            if not arch:
                raise ValueError(f"{path}: line {line}, column 'arch': empty; expected an architecture name")
            values = [_positive_number(path, line, name, row.get(name)) for name in ("N", "D", "loss")]
            rows.setdefault(arch, []).append((*values, line))
    if not rows:
        raise ValueError(f"{path}: no data rows; expected one row per run with columns {','.join(CSV_COLUMNS)}")
    data = {}
    for arch, points in rows.items():
        if len(points) < MIN_POINTS:
            raise ValueError(
                f"{path}: architecture {arch!r} has {len(points)} point(s) (lines "
                f"{', '.join(str(p[3]) for p in points)}); the fit has {MIN_POINTS} parameters (E, A, alpha, B, beta) "
                f"and needs at least {MIN_POINTS} points per architecture"
            )
        array = np.array([p[:3] for p in points], dtype=np.float64)
        data[arch] = ScalingData(array[:, 0], array[:, 1], array[:, 2])
    return data


def _positive_number(path: Path, line: int, column: str, text: str | None) -> float:
    meaning = {"N": "a parameter count", "D": "a token count", "loss": "a loss"}[column]
    text = (text or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"{path}: line {line}, column {column!r}: {text!r} is not a number; expected {meaning}, a positive number"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{path}: line {line}, column {column!r}: {text}; expected {meaning}, a finite positive number"
        )
    return value


def _as_points(N, D, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (N, D, loss)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"N, D and loss must have the same length, got {[a.size for a in arrays]}")
    for name, array in zip(("N", "D", "loss"), arrays):
        bad = ~np.isfinite(array) | (array <= 0)
        if bad.any():
            raise ValueError(f"{name} must be finite and positive; index {int(np.argmax(bad))} is {array[bad][0]}")
    if arrays[0].size < MIN_POINTS:
        raise ValueError(f"got {arrays[0].size} points; the fit has {MIN_POINTS} parameters and needs at least "
                         f"{MIN_POINTS} points")
    for name, array in zip(("N", "D"), arrays[:2]):
        distinct = np.unique(array).size
        if distinct < MIN_DISTINCT:
            raise ValueError(f"got {distinct} distinct value(s) of {name}; the fit needs at least {MIN_DISTINCT} to "
                             f"identify the {'A, alpha' if name == 'N' else 'B, beta'} term separately from E")
    return arrays[0], arrays[1], arrays[2]


# ----------------------------------------------------------------------------------------------------------------------
# The fitted law


@dataclass(frozen=True)
class ComputeOptimal:
    """The compute-optimal run at budget `compute` (FLOPs, C = 6 N D) and the loss the law predicts for it."""

    compute: float
    N: float
    D: float
    loss: float


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted to `n_points` runs.

    huber: the minimised objective, sum over points of Huber_delta(log pred - log actual).
    r2: coefficient of determination of the predicted loss (linear scale) on the fitted points.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    delta: float = 1e-3
    huber: float = float("nan")
    r2: float = float("nan")
    n_points: int = 0

    @property
    def params(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    @property
    def a_opt(self) -> float:
        """Exponent of the compute-optimal size: N* proportional to C^a_opt."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b_opt(self) -> float:
        """Exponent of the compute-optimal token count: D* proportional to C^b_opt."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """(alpha A / (beta B))^(1 / (alpha + beta)): N* = G (C/6)^a_opt and D* = (C/6)^b_opt / G."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def predict(self, N, D) -> np.ndarray:
        """Predicted loss at N parameters and D tokens (broadcasting float64 arrays or scalars)."""
        N = np.asarray(N, dtype=np.float64)
        D = np.asarray(D, dtype=np.float64)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta

    def loss_floor(self, N: float) -> float:
        """E + A / N^alpha: the loss a model of N parameters approaches with unlimited tokens."""
        return self.E + self.A * float(N) ** -self.alpha

    def tokens_to_loss(self, N: float, L: float) -> float | None:
        """Tokens D(N, L) = (B / (L - E - A/N^alpha))^(1/beta) that a model of N parameters needs to reach loss L.

        None when L <= E + A/N^alpha: the target is below what N parameters can reach, so D is undefined.
        """
        log_tokens = self._log_tokens_to_loss(N, L)
        if log_tokens is None:
            return None
        return math.exp(log_tokens) if log_tokens < 709.0 else math.inf

    def _log_tokens_to_loss(self, N: float, L: float) -> float | None:
        gap = float(L) - self.loss_floor(N)
        if not gap > 0:
            return None
        return (math.log(self.B) - math.log(gap)) / self.beta

    def compute_optimal(self, C: float) -> ComputeOptimal:
        """The N, D minimising L(N, D) subject to 6 N D = C, in closed form, and the loss there."""
        C = float(C)
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"compute budget must be a finite positive number of FLOPs, got {C}")
        N = self.G * (C / 6.0) ** self.a_opt
        D = (C / 6.0) ** self.b_opt / self.G
        return ComputeOptimal(C, N, D, float(self.predict(N, D)))


def token_savings(fit_ref: ChinchillaFit, fit_arch: ChinchillaFit, N: float, L: float) -> float | None:
    """How many times more tokens the reference needs than `fit_arch` to reach loss L at N parameters.

    D_ref(N, L) / D_arch(N, L) (computed in log space). None when either architecture cannot reach L at N, i.e.
    when L <= E + A/N^alpha for that fit: the factor is then undefined.
    """
    log_ref = fit_ref._log_tokens_to_loss(N, L)
    log_arch = fit_arch._log_tokens_to_loss(N, L)
    if log_ref is None or log_arch is None:
        return None
    difference = log_ref - log_arch
    return math.exp(difference) if difference < 709.0 else math.inf


# ----------------------------------------------------------------------------------------------------------------------
# Fitting


def _huber_objective(theta: np.ndarray, log_N, log_D, log_loss, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber_delta(r) / delta^2 over points and its gradient; r = log pred - log actual.

    theta = (e, a, alpha, b, beta) with E = exp(e), A = exp(a), B = exp(b), so that
    log pred = logsumexp(e, a - alpha log N, b - beta log D). Dividing by delta^2 makes the quadratic region
    0.5 (r/delta)^2, of order one, so the optimiser's tolerances mean the same for any delta.
    """
    e, a, alpha, b, beta = theta
    terms = np.stack([np.full_like(log_N, e), a - alpha * log_N, b - beta * log_D])  # (3, n)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss
    weights /= total  # softmax: d(log pred) / d(term)
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum() / delta**2
    psi = np.clip(residual, -delta, delta) / delta**2
    gradient = np.array([
        psi @ weights[0],
        psi @ weights[1],
        -(psi * weights[1]) @ log_N,
        psi @ weights[2],
        -(psi * weights[2]) @ log_D,
    ])
    return float(value), gradient


def _grid_starts(N, D, loss, n_starts: int, delta: float) -> np.ndarray:
    """The n_starts best starting points theta = (e, a, alpha, b, beta) from a grid over (alpha, beta).

    With the exponents fixed the law is linear in (E, A, B); solve for them by least squares on relative error,
    clip to positive, and rank the grid by the Huber objective.
    """
    alphas, betas = np.meshgrid(EXPONENT_GRID, EXPONENT_GRID, indexing="ij")
    alphas, betas = alphas.ravel(), betas.ravel()  # (g,)
    design = np.stack([
        np.ones((alphas.size, N.size)),
        N[None, :] ** -alphas[:, None],
        D[None, :] ** -betas[:, None],
    ], axis=-1) / loss[None, :, None]  # (g, n, 3), rows scaled to relative error
    linear = np.einsum("gkn,n->gk", np.linalg.pinv(design), np.ones(N.size))  # (g, 3): E, A, B
    floor = 1e-6 * loss.min()
    E = np.maximum(linear[:, 0], floor)
    A = np.maximum(linear[:, 1], floor)
    B = np.maximum(linear[:, 2], floor)
    E = np.maximum(E, math.exp(LOG_E_MIN))
    prediction = np.einsum("gnk,gk->gn", design, np.stack([E, A, B], axis=1)) * loss  # undo the row scaling
    residual = np.abs(np.log(prediction) - np.log(loss))
    values = np.where(residual <= delta, 0.5 * residual**2, delta * (residual - 0.5 * delta)).sum(axis=1)
    thetas = np.stack([np.log(E), np.log(A), alphas, np.log(B), betas], axis=1)
    return thetas[np.argsort(values)[:n_starts]]


def fit_chinchilla(
    N,
    D,
    loss,
    *,
    delta: float = 1e-3,
    inits: Sequence[Sequence[float]] | np.ndarray | None = None,
    n_starts: int = 8,
) -> ChinchillaFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs (N[i] parameters, D[i] tokens, loss[i]).

    Minimises sum_i Huber_delta(log pred_i - log loss_i) over (log E, log A, alpha, log B, beta) with L-BFGS-B and
    an analytic gradient, alpha and beta in [1e-3, 4], from several starting points; returns the best end point.

    N, D, loss: array-likes of shape (n,), finite and positive, n >= 5, with at least 3 distinct N and 3 distinct D.
    inits: starting points, shape (k, 5) as (E, A, alpha, B, beta). Default: the n_starts best points of a grid
        over (alpha, beta) in [0.05, 2] (step 0.05) with E, A, B solved by linear least squares at each.
    """
    optimize = _require_scipy("fit_chinchilla")
    N, D, loss = _as_points(N, D, loss)
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    if inits is not None:
        natural = np.asarray(inits, dtype=np.float64).reshape(-1, 5)
        if not (np.isfinite(natural).all() and (natural[:, [0, 1, 3]] > 0).all()):
            raise ValueError("inits must be rows of (E, A, alpha, B, beta) with E, A, B positive and all finite")
        starts = np.stack([np.maximum(np.log(natural[:, 0]), LOG_E_MIN), np.log(natural[:, 1]), natural[:, 2],
                           np.log(natural[:, 3]), natural[:, 4]], axis=1)
    log_N, log_D, log_loss = np.log(N), np.log(D), np.log(loss)
    upper_e = math.log(loss.max())
    bounds = [(LOG_E_MIN, upper_e), (None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS]
    with _one_blas_thread():
        if inits is None:
            starts = _grid_starts(N, D, loss, n_starts, delta)
        best = _best_of_starts(optimize, starts, log_N, log_D, log_loss, delta, upper_e, bounds)
    e, a, alpha, b, beta = best.x
    fit = ChinchillaFit(math.exp(e), math.exp(a), float(alpha), math.exp(b), float(beta), delta=delta,
                        huber=float(best.fun) * delta**2, n_points=int(N.size))
    residual = fit.predict(N, D) - loss
    total = ((loss - loss.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else float("nan")
    return ChinchillaFit(**{**fit.params, "delta": delta, "huber": fit.huber, "r2": r2, "n_points": fit.n_points})


def _one_blas_thread():
    """Limit BLAS to one thread while optimising, when threadpoolctl is installed.

    L-BFGS-B calls BLAS on 5-vectors thousands of times per fit; with a multi-threaded OpenBLAS on a busy machine
    the thread hand-offs made fits 20x slower (measured: 2.2 s vs 0.11 s per 25-point fit on 2 loaded cores;
    scipy 1.17.1, OpenBLAS 0.3.31).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _best_of_starts(optimize, starts, log_N, log_D, log_loss, delta, upper_e, bounds):
    best = None
    for start in starts:
        start = start.copy()
        start[0] = min(start[0], upper_e)
        start[[2, 4]] = np.clip(start[[2, 4]], *EXPONENT_BOUNDS)
        result = optimize.minimize(
            _huber_objective, start, args=(log_N, log_D, log_loss, delta), jac=True, method="L-BFGS-B",
            bounds=bounds, options={"ftol": 0.0, "gtol": 1e-10, "maxiter": 10_000},
        )
        if best is None or result.fun < best.fun:
            best = result
    return best


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of a 1-D sample (e.g. 2.5th and 97.5th percentiles for 0.95)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("percentile_interval needs at least one value")
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class BootstrapFits:
    """Refits of the law on resampled points; fits[i] is the i-th refit (paired across architectures by index)."""

    fits: tuple[ChinchillaFit, ...]

    def values(self, name: str) -> np.ndarray:
        """float64 (n_bootstrap,): parameter `name` (one of INTERVAL_NAMES) of every refit."""
        if name not in INTERVAL_NAMES:
            raise ValueError(f"unknown quantity {name!r}; expected one of {', '.join(INTERVAL_NAMES)}")
        return np.array([getattr(fit, name) for fit in self.fits])

    def interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of `name` over the refits."""
        return percentile_interval(self.values(name), level)

    def intervals(self, level: float = 0.95) -> dict[str, tuple[float, float]]:
        return {name: self.interval(name, level) for name in INTERVAL_NAMES}


def bootstrap_fit(
    N,
    D,
    loss,
    *,
    n_bootstrap: int = 200,
    seed: int | np.random.Generator | np.random.SeedSequence | None = 0,
    delta: float = 1e-3,
    n_starts: int = 8,
) -> BootstrapFits:
    """Refit the law on n_bootstrap resamples of the points (drawn with replacement, same count as the data).

    A resample with fewer than 3 distinct N or D cannot identify the exponents and is drawn again. The same seed
    gives the same refits. Use BootstrapFits.interval for percentile intervals.
    """
    N, D, loss = _as_points(N, D, loss)
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n_bootstrap):
        for _attempt in range(1000):
            index = rng.integers(0, N.size, size=N.size)
            if np.unique(N[index]).size >= MIN_DISTINCT and np.unique(D[index]).size >= MIN_DISTINCT:
                break
        else:
            raise ValueError("could not draw a resample with 3 distinct N and D values in 1000 tries; the data has "
                             "too few distinct sizes or token counts for a bootstrap")
        fits.append(fit_chinchilla(N[index], D[index], loss[index], delta=delta, n_starts=n_starts))
    return BootstrapFits(tuple(fits))


# ----------------------------------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class HeldOutError:
    """Error of a fit on the points of size N = held_out_N, fitted without them (on train_sizes)."""

    held_out_N: float
    train_sizes: tuple[float, ...]
    n_points: int
    mean_abs_rel_error: float  # mean over the held-out points of |pred - actual| / actual


def _held_out(N, D, loss, train: np.ndarray, held_out_N: float, delta: float, n_starts: int) -> HeldOutError:
    fit = fit_chinchilla(N[train], D[train], loss[train], delta=delta, n_starts=n_starts)
    test = N == held_out_N
    error = np.abs(fit.predict(N[test], D[test]) - loss[test]) / loss[test]
    return HeldOutError(float(held_out_N), tuple(float(n) for n in np.unique(N[train])), int(test.sum()),
                        float(error.mean()))


def leave_one_size_out(N, D, loss, *, delta: float = 1e-3, n_starts: int = 8) -> list[HeldOutError]:
    """For each distinct N: fit on the other sizes, report the mean absolute relative error on that size's points.

    Needs at least 4 distinct sizes (each fit needs 3). Returns one HeldOutError per size, ascending N.
    """
    N, D, loss = _as_points(N, D, loss)
    sizes = np.unique(N)
    if sizes.size <= MIN_DISTINCT:
        raise ValueError(f"leave-one-size-out needs at least {MIN_DISTINCT + 1} distinct sizes N (each fit needs "
                         f"{MIN_DISTINCT}), got {sizes.size}")
    return [_held_out(N, D, loss, N != size, size, delta, n_starts) for size in sizes]


def rollout_error(N, D, loss, *, delta: float = 1e-3, n_starts: int = 8) -> HeldOutError:
    """Fit on every size smaller than the largest N and report the error on the largest size's points."""
    N, D, loss = _as_points(N, D, loss)
    sizes = np.unique(N)
    if sizes.size <= MIN_DISTINCT:
        raise ValueError(f"the rollout needs at least {MIN_DISTINCT + 1} distinct sizes N (the fit on the smaller "
                         f"ones needs {MIN_DISTINCT}), got {sizes.size}")
    return _held_out(N, D, loss, N < sizes[-1], sizes[-1], delta, n_starts)


# ----------------------------------------------------------------------------------------------------------------------
# Whole-results analysis: what `hybridlm fit` reports


@dataclass(frozen=True)
class ArchitectureAnalysis:
    """Point fit, bootstrap refits and cross-validation of one architecture.

    held_out / rollout are empty / None when the data has too few sizes; validation_note then says why.
    """

    arch: str
    data: ScalingData
    fit: ChinchillaFit
    bootstrap: BootstrapFits
    held_out: tuple[HeldOutError, ...] = ()
    rollout: HeldOutError | None = None
    validation_note: str = ""


def analyse(
    data: dict[str, ScalingData],
    *,
    n_bootstrap: int = 200,
    seed: int = 0,
    delta: float = 1e-3,
    n_starts: int = 8,
) -> dict[str, ArchitectureAnalysis]:
    """Fit, bootstrap and cross-validate every architecture. Each gets its own random stream spawned from `seed`."""
    streams = np.random.SeedSequence(seed).spawn(len(data))
    analyses = {}
    for stream, (arch, points) in zip(streams, data.items()):
        try:
            fit = fit_chinchilla(points.N, points.D, points.loss, delta=delta, n_starts=n_starts)
        except ValueError as error:
            raise ValueError(f"architecture {arch!r}: {error}") from None
        bootstrap = bootstrap_fit(points.N, points.D, points.loss, n_bootstrap=n_bootstrap, seed=stream, delta=delta,
                                  n_starts=n_starts)
        held_out, rollout, note = (), None, ""
        try:
            held_out = tuple(leave_one_size_out(points.N, points.D, points.loss, delta=delta, n_starts=n_starts))
            rollout = rollout_error(points.N, points.D, points.loss, delta=delta, n_starts=n_starts)
        except ValueError as error:
            note = str(error)
        analyses[arch] = ArchitectureAnalysis(arch, points, fit, bootstrap, held_out, rollout, note)
    return analyses


@dataclass(frozen=True)
class SavingsPoint:
    """Token-savings factor D_ref(N, L*) / D_arch(N, L*) of `arch` against `reference` at size N and loss L*.

    factor / tokens_* are None when undefined (note says which fit cannot reach L* at N). interval is the percentile
    interval of the factor over the paired bootstrap refits (ref refit i with arch refit i); n_defined of n_bootstrap
    refits give a defined factor. The interval is None when the point factor is undefined or when fewer than a
    fraction `level` of the refits are defined (a level-interval must hold that share of the refits).
    """

    arch: str
    reference: str
    N: float
    target_loss: float
    factor: float | None
    tokens_ref: float | None
    tokens_arch: float | None
    interval: tuple[float, float] | None
    n_defined: int
    n_bootstrap: int
    note: str = ""


def savings_point(reference: ArchitectureAnalysis, arch: ArchitectureAnalysis, N: float, target_loss: float,
                  level: float = 0.95) -> SavingsPoint:
    """The savings factor of `arch` against `reference` at (N, L*), with its paired-bootstrap interval."""
    if len(reference.bootstrap.fits) != len(arch.bootstrap.fits):
        raise ValueError(f"paired bootstrap needs the same number of refits; {reference.arch!r} has "
                         f"{len(reference.bootstrap.fits)}, {arch.arch!r} has {len(arch.bootstrap.fits)}")
    factor = token_savings(reference.fit, arch.fit, N, target_loss)
    notes = [f"{name!r} cannot reach loss {target_loss:.4g} at N={N:.4g} (floor E + A/N^alpha = "
             f"{fit.loss_floor(N):.4g})" for name, fit in ((reference.arch, reference.fit), (arch.arch, arch.fit))
             if fit.tokens_to_loss(N, target_loss) is None]
    paired = [token_savings(ref_fit, arch_fit, N, target_loss)
              for ref_fit, arch_fit in zip(reference.bootstrap.fits, arch.bootstrap.fits)]
    defined = [value for value in paired if value is not None]
    enough = factor is not None and len(defined) >= level * len(paired)
    return SavingsPoint(
        arch.arch, reference.arch, float(N), float(target_loss), factor,
        reference.fit.tokens_to_loss(N, target_loss), arch.fit.tokens_to_loss(N, target_loss),
        percentile_interval(defined, level) if enough else None, len(defined), len(paired), "; ".join(notes),
    )


def default_target_losses(analyses: dict[str, ArchitectureAnalysis]) -> list[float]:
    """A few target losses every architecture can reach with enough N and D (all above the largest E).

    The best observed loss, the median observed loss, the midpoint of the two, and one extrapolated target halfway
    from the best observed loss down to the largest E; rounded to 3 decimals.
    """
    losses = np.concatenate([a.data.loss for a in analyses.values()])
    floor = max(a.fit.E for a in analyses.values())
    best, median = float(losses.min()), float(np.median(losses))
    candidates = [(floor + best) / 2, best, (best + median) / 2, median]
    return sorted({round(value, 3) for value in candidates if round(value, 3) > floor})


def default_savings_sizes(reference: ScalingData) -> list[float]:
    """The reference's sizes plus the extrapolations 1B, 7B and 70B above them."""
    sizes = [float(n) for n in reference.sizes]
    return sizes + [n for n in (1e9, 7e9, 70e9) if n > sizes[-1]]


def default_compute_budgets(data: dict[str, ScalingData]) -> list[float]:
    """Evenly spaced powers of ten (at most 6) from the smallest run's compute to 1000x the largest's (C = 6 N D)."""
    compute = np.concatenate([points.compute for points in data.values()])
    low, high = math.ceil(math.log10(compute.min())), math.ceil(math.log10(compute.max())) + 3
    step = max(1, math.ceil((high - low) / 5))
    return [10.0**k for k in range(low, high + 1, step)]


def savings_table(analyses: dict[str, ArchitectureAnalysis], reference: str, sizes: Sequence[float],
                  target_losses: Sequence[float], level: float = 0.95) -> list[SavingsPoint]:
    """savings_point for every architecture other than `reference`, every size and every target loss."""
    if reference not in analyses:
        raise ValueError(f"unknown reference architecture {reference!r}; the results have: {', '.join(analyses)}")
    return [savings_point(analyses[reference], analysis, N, target, level)
            for analysis in analyses.values() if analysis.arch != reference
            for N in sizes for target in target_losses]


def report_json(analyses: dict[str, ArchitectureAnalysis], *, reference: str | None,
                savings: Sequence[SavingsPoint], compute_budgets: Sequence[float], level: float = 0.95) -> dict:
    """{arch: {E, A, alpha, B, beta, a_opt, b_opt, G, r2, huber, n_points, sizes, ci, loso_error, compute_optimal,
    savings}}, JSON-serialisable (undefined values are null, never NaN).

    ci: {"level", "n_bootstrap", name: [low, high]}; loso_error: {"per_size": [...], "mean", "rollout", "note"};
    savings: null for the reference and when there is none, else {"reference", "points": [...]}.
    """
    report = {}
    for arch, analysis in analyses.items():
        fit = analysis.fit
        entry = {**fit.params, "a_opt": fit.a_opt, "b_opt": fit.b_opt, "G": fit.G, "r2": _finite_or_none(fit.r2),
                 "huber": fit.huber, "n_points": fit.n_points, "sizes": [float(n) for n in analysis.data.sizes]}
        entry["ci"] = {"level": level, "n_bootstrap": len(analysis.bootstrap.fits),
                       **{name: list(bounds) for name, bounds in analysis.bootstrap.intervals(level).items()}}
        entry["loso_error"] = {
            "per_size": [_held_out_json(h) for h in analysis.held_out],
            "mean": float(np.mean([h.mean_abs_rel_error for h in analysis.held_out])) if analysis.held_out else None,
            "rollout": _held_out_json(analysis.rollout) if analysis.rollout else None,
            "note": analysis.validation_note,
        }
        entry["compute_optimal"] = [
            {"C": point.compute, "N": point.N, "D": point.D, "loss": point.loss}
            for point in (fit.compute_optimal(C) for C in compute_budgets)
        ]
        points = [p for p in savings if p.arch == arch]
        entry["savings"] = None if reference is None or arch == reference else {
            "reference": reference,
            "points": [{"N": p.N, "target_loss": p.target_loss, "factor": p.factor, "tokens_ref": p.tokens_ref,
                        "tokens_arch": p.tokens_arch, "ci": list(p.interval) if p.interval else None,
                        "n_defined": p.n_defined, "n_bootstrap": p.n_bootstrap,
                        "undefined_reason": p.note or None} for p in points],
        }
        report[arch] = entry
    return report


def _held_out_json(held_out: HeldOutError) -> dict:
    return {"N": held_out.held_out_N, "n_points": held_out.n_points, "train_sizes": list(held_out.train_sizes),
            "mean_abs_rel_error": held_out.mean_abs_rel_error}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
