"""The best learning rate at one model size, with an interval.

At one size (`best_lr`): loss against x = ln(lr) is fitted with a parabola around its
minimum, the second-order expansion of the curve there. The window is the grid point
with the lowest mean loss and `window` (default 2) grid points on each side: on a
factor-2 grid that spans 4x either way, wide enough to average the noise of single
points, narrow enough that the curve's asymmetry (a steep rise towards divergence)
stays small. The best lr is the parabola's vertex, confined to the window: a vertex
outside it (a flat or lopsided curve) is clamped to the window's end and noted, and a
curve with no convex fit falls back to the lowest grid point. Nothing is extrapolated
past the grid: when the lowest mean is the grid's first or last point, the result is
flagged (`edge`) and its interval is open on that side.

A grid point's loss is the mean over its seeds; a point where any seed has no finite
loss (it diverged) has an infinite mean and leaves the fit (it is listed in
`diverged_lrs`).

The interval is a percentile bootstrap that repeats the whole procedure (lowest
point, window, fit, clamp) on each draw, so the uncertainty of which point is lowest
is in it too:

- with seeds (some point has 2 or more), each point's seeds are resampled: a point of
  n seeds gets its mean plus the mean of n deviations drawn with replacement from the
  pooled deviations of every point's seeds from their point's mean. The deviations are
  scaled by sqrt(n / (n - 1)) so that a resampled mean has the variance s^2 / n of the
  usual estimate (the plain bootstrap gives (n - 1) / n of it: half with 2 seeds). The
  pool is shared because 2 or 3 seeds per point estimate a point's own spread too
  poorly to resample it alone; the noise is taken as the same at every point of the
  grid. Resampling each point on its own treats an offset that a seed shares across
  the grid (its data order, its init) as noise, so the interval errs wide when seeds
  are shared across learning rates;
- with one seed everywhere, the residuals of the window's parabola (scaled by
  sqrt(m / (m - 3)) for its three parameters over m points) are the pool, one draw per
  point;
- either way the noise level is estimated from few degrees of freedom (the seeds'
  sum of n - 1, or m - 3), which a percentile bootstrap ignores: the draws are widened
  about the estimate by t_dof / z at the interval's level, as a t interval widens a z
  interval, and kept on the grid. On synthetic curves this brings the coverage of the
  90% interval to 0.88..0.93 (tests/unit/report/test_lr_fit.py);
- with one seed and a window of 3 points nothing estimates the noise: the interval is
  the bracket the grid itself gives, the two neighbours of the lowest point (a
  unimodal curve has its minimum between them), drawn uniformly for propagation.

Across sizes, the trend of these best lrs and the target's prediction are trend.py's.

Everything is deterministic for a given `seed` (a numpy Generator). Give each size its
own seed (the index of the size, say): draws made with one seed at two sizes share
their random numbers and would not be independent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raygpt import status
from raygpt.errors import UserError

LEVEL = 0.9
WINDOW = 2
N_BOOT = 2000
MIN_POINTS = 3  # a parabola has three parameters
# Smallest sd of ln(best lr) a size's weight assumes: a noise-free synthetic size would
# otherwise get an infinite weight.
SD_FLOOR = 0.01
LOSS_KEY = "final_val_loss"
# A trial whose loss reads as the loss of its learning rate at full budget: completed,
# or diverged (its loss counts as infinite). Stopped early, running or errored: none.
USABLE_STATUSES = (status.COMPLETED, status.DIVERGED)


# --------------------------------------------------------------------------- formatting


def sci(x: float | None, digits: int = 2) -> str:
    """3.1e-3, not 0.0031 or 3.1e-03; "?" for None."""
    if x is None or not math.isfinite(x):
        return "?"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def num(x: float) -> str:
    """A size as written in a config: 64, not 64.0."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# --------------------------------------------------------------------------- one size


@dataclass(frozen=True)
class BestLR:
    """The best learning rate at one size, with its interval."""

    lr: float
    low: float | None  # None: open, the optimum may lie below the grid
    high: float | None  # None: open, the optimum may lie above the grid
    edge: str | None  # "lowest" or "highest" when the lowest mean loss is at the grid's end
    fit: str  # "parabola", or "grid" (no convex parabola: the lowest point)
    interval: str  # "seeds", "residuals" or "bracket" (see the module docstring)
    level: float
    grid: tuple[float, ...]  # learning rates with a finite mean loss, ascending
    mean_loss: tuple[float, ...]
    seeds: tuple[int, ...]  # trials per grid point
    window: tuple[float, float]  # the span of learning rates the parabola was fitted on
    diverged_lrs: tuple[float, ...]
    notes: tuple[str, ...]
    draws: np.ndarray = field(repr=False, compare=False)  # ln(best lr), one per draw

    @property
    def diverged_above(self) -> bool:
        """A learning rate above the grid diverged: the top of the grid is the edge of
        stability, not of the search."""
        return any(lr > self.grid[-1] for lr in self.diverged_lrs)

    @property
    def log_sd(self) -> float:
        """The sd of ln(best lr) over the draws, at least SD_FLOOR."""
        return max(float(np.std(self.draws)), SD_FLOOR)

    def describe(self) -> str:
        lo = sci(self.low) if self.low is not None else "open"
        hi = sci(self.high) if self.high is not None else "open"
        edge = f", at the grid's {self.edge} point" if self.edge else ""
        return f"lr {sci(self.lr)} ({self.level:.0%}: {lo}..{hi}{edge})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "low": self.low,
            "high": self.high,
            "edge": self.edge,
            "fit": self.fit,
            "interval": self.interval,
            "level": self.level,
            "grid": list(self.grid),
            "mean_loss": list(self.mean_loss),
            "seeds": list(self.seeds),
            "window": list(self.window),
            "diverged_lrs": list(self.diverged_lrs),
            "notes": list(self.notes),
        }


def _window(i: int, points: int, half: int) -> tuple[int, int]:
    """Grid indices lo..hi around i, `half` each side, cut at the grid's ends and widened
    on the open side to 3 points when a cut leaves fewer."""
    lo, hi = max(0, i - half), min(points - 1, i + half)
    while hi - lo + 1 < MIN_POINTS:
        if lo > 0:
            lo -= 1
        else:
            hi += 1
    return lo, hi


def _vertices(
    x: np.ndarray, y: np.ndarray, n: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The procedure on each row of y (draws x grid points), vectorised over rows.

    Returns, per row: the best ln(lr), the index of the lowest point, the window's lo
    and hi, whether the parabola was convex, and whether its vertex was clamped.
    """
    points = y.shape[1]
    best = np.argmin(y, axis=1)
    bounds = np.array([_window(int(i), points, half) for i in range(points)])
    lo, hi = bounds[best, 0], bounds[best, 1]
    idx = np.arange(points)
    inside = (idx[None, :] >= lo[:, None]) & (idx[None, :] <= hi[:, None])
    w = np.where(inside, n[None, :].astype(float), 0.0)
    # Centred x keeps the normal equations well conditioned.
    xc = x - x.mean()
    powers = xc[None, :] ** np.arange(5)[:, None]  # (5, points)
    s = w @ powers.T  # (rows, 5): sum w x^k
    t = (w * y) @ powers[:3].T  # (rows, 3): sum w y x^k
    normal = np.stack(
        [
            np.stack([s[:, 4], s[:, 3], s[:, 2]], axis=1),
            np.stack([s[:, 3], s[:, 2], s[:, 1]], axis=1),
            np.stack([s[:, 2], s[:, 1], s[:, 0]], axis=1),
        ],
        axis=1,
    )
    rhs = np.stack([t[:, 2], t[:, 1], t[:, 0]], axis=1)[..., None]
    a, b, _ = np.linalg.solve(normal, rhs)[..., 0].T
    convex = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(convex, x.mean() - b / (2 * a), x[best])
    x_lo, x_hi = x[lo], x[hi]
    clamped = convex & ((vertex < x_lo) | (vertex > x_hi))
    return np.clip(vertex, x_lo, x_hi), best, lo, hi, convex, clamped


def _parabola(x: np.ndarray, y: np.ndarray, n: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The window's fitted losses at every grid point (for the residuals)."""
    sl = slice(lo, hi + 1)
    coef = np.polyfit(x[sl] - x.mean(), y[sl], 2, w=np.sqrt(n[sl]))
    return np.polyval(coef, x - x.mean())


def best_lr(
    lrs: Iterable[float],
    losses: Iterable[float],
    *,
    window: int = WINDOW,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    label: str = "",
) -> BestLR:
    """The best learning rate of one curve: trials (lr, loss), repeats of an lr being seeds.

    A non-finite loss (a diverged trial) makes its lr's mean infinite. Raises UserError
    with fewer than 3 learning rates with a finite mean loss. `label` ("adamw at
    n_embd=64") starts the messages.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 grid point, got {window}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lr_arr = np.asarray(list(lrs), dtype=float)
    loss_arr = np.asarray(list(losses), dtype=float)
    if lr_arr.shape != loss_arr.shape:
        raise ValueError(f"{len(lr_arr)} learning rates but {len(loss_arr)} losses")
    prefix = f"{label}: " if label else ""
    if not np.all(np.isfinite(lr_arr) & (lr_arr > 0)):
        raise UserError(f"{prefix}every learning rate must be a positive number")
    keys = np.round(np.log(lr_arr), 9)
    grid, losses_at, diverged = [], [], []
    for key in np.unique(keys):
        at = loss_arr[keys == key]
        lr = float(lr_arr[keys == key][0])
        if np.all(np.isfinite(at)):
            grid.append(lr)
            losses_at.append(at)
        else:
            diverged.append(lr)
    if len(grid) < MIN_POINTS:
        shown = ", ".join(sci(v) for v in grid) or "none"
        raise UserError(
            f"{prefix}{len(grid)} learning rate(s) with a finite loss ({shown}); fitting a "
            f"best lr needs at least {MIN_POINTS}: sweep more learning rates around the best"
        )
    x = np.log(np.asarray(grid))
    n = np.array([len(a) for a in losses_at])
    ybar = np.array([a.mean() for a in losses_at])
    points = len(grid)

    point, best, lo, hi, convex, clamped = (v[0] for v in _vertices(x, ybar[None, :], n, window))
    best, lo, hi = int(best), int(lo), int(hi)
    edge = "lowest" if best == 0 else "highest" if best == points - 1 else None
    notes = []
    if not convex:
        notes.append(
            "the losses around the lowest point fit no convex parabola: the best lr is the "
            "lowest point"
        )
    if clamped:
        notes.append(
            "the parabola's vertex lies outside its window: the best lr is the window's end"
        )

    rng = np.random.default_rng(seed)
    m = hi - lo + 1
    if n.max() >= 2:
        kind = "seeds"
        pool = np.concatenate(
            [(a - a.mean()) * math.sqrt(len(a) / (len(a) - 1)) for a in losses_at if len(a) >= 2]
        )
        dof = int(np.sum(n - 1))
    elif m > MIN_POINTS:
        kind = "residuals"
        fitted = _parabola(x, ybar, n, lo, hi)
        pool = (ybar - fitted)[lo : hi + 1] * math.sqrt(m / (m - MIN_POINTS))
        dof = m - MIN_POINTS
    else:
        kind = "bracket"
    if kind == "bracket":
        left, right = x[max(best - 1, 0)], x[min(best + 1, points - 1)]
        draws = rng.uniform(left, right, n_boot)
        low = grid[best - 1] if best > 0 else None
        high = grid[best + 1] if best < points - 1 else None
        notes.append(
            "one seed and a 3-point window: no estimate of the noise, so the interval is the "
            "grid's bracket around the lowest point"
        )
    else:
        y = np.empty((n_boot, points))
        for j in range(points):
            picks = rng.integers(0, len(pool), size=(n_boot, n[j]))
            y[:, j] = ybar[j] + pool[picks].mean(axis=1)
        draws = _vertices(x, y, n, window)[0]
        # The noise level comes from `dof` degrees of freedom: widen by t/z, as a t
        # interval widens a z interval, and stay on the grid. (scipy.stats takes most of a
        # second to import: only here, not for every `python -m raygpt.report`.)
        from scipy import stats

        tail = (1 - level) / 2
        q = level if edge else 1 - tail  # the quantile the interval's bound is read at
        widen = stats.t.ppf(q, dof) / stats.norm.ppf(q)
        draws = np.clip(point + widen * (draws - point), x[0], x[-1])
        low = math.exp(float(np.quantile(draws, tail)))
        high = math.exp(float(np.quantile(draws, 1 - tail)))
        # One-sided at an edge: the bound on the closed side holds with `level`.
        if edge == "lowest":
            low, high = None, math.exp(float(np.quantile(draws, level)))
        elif edge == "highest":
            low, high = math.exp(float(np.quantile(draws, 1 - level))), None
    if edge == "lowest":
        notes.append(
            f"the lowest mean loss is at the grid's lowest lr {sci(grid[0])}: the optimum may "
            "lie below; extend the grid down"
        )
    elif edge == "highest":
        where = (
            f"{sci(grid[-1])}, and a larger lr diverged"
            if any(d > grid[-1] for d in diverged)
            else sci(grid[-1])
        )
        notes.append(
            f"the lowest mean loss is at the grid's highest lr {where}: the optimum may lie "
            "above; extend the grid up"
        )
    else:
        if low is not None and math.isclose(low, grid[0]):
            notes.append("the interval reaches the grid's lowest lr: it may extend below")
        if high is not None and math.isclose(high, grid[-1]):
            notes.append("the interval reaches the grid's highest lr: it may extend above")
    return BestLR(
        lr=math.exp(float(point)),
        low=low,
        high=high,
        edge=edge,
        fit="parabola" if convex else "grid",
        interval=kind,
        level=level,
        grid=tuple(grid),
        mean_loss=tuple(float(v) for v in ybar),
        seeds=tuple(int(v) for v in n),
        window=(grid[lo], grid[hi]),
        diverged_lrs=tuple(diverged),
        notes=tuple(notes),
        draws=np.asarray(draws, dtype=float),
    )


def usable_trials(
    rows: Iterable[Mapping[str, Any]], loss_key: str = LOSS_KEY
) -> dict[str, tuple[list[float], list[float]]]:
    """Trial rows (trials.parquet's: optimizer, learning_rate, status, final_val_loss) as
    (lrs, losses) per optimizer, for `best_lr`.

    Rows without a status count as completed. Diverged trials count with an infinite
    loss (whatever they recorded before diverging); stopped-early, running and errored
    trials did not train the full budget and are left out.
    """
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        state = row.get("status") or status.COMPLETED
        lr = row.get("learning_rate")
        if state not in USABLE_STATUSES or lr is None:
            continue
        loss = row.get(loss_key)
        loss = math.inf if state == status.DIVERGED or loss is None else float(loss)
        lrs, losses = out.setdefault(str(row.get("optimizer") or "?"), ([], []))
        lrs.append(float(lr))
        losses.append(loss)
    return out
