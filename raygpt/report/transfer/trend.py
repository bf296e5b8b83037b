"""The trend of the best learning rate across proxy sizes, and its prediction at a target.

`fit_trend`: ln(best lr) = c + sum_j k_j ln(size_j) over the axes that
vary among the proxies (n_embd, n_layer, a parameter count). The point fit is
weighted least squares with weights 1 / var(ln best lr) from each size's draws; the
interval refits the same line on every bootstrap draw of every size's best lr, which
carries each size's interval into the slope and the prediction. Where more sizes than
parameters leave residual degrees of freedom and the sizes scatter about the line more
than their intervals allow (reduced chi^2 > 1), the draws are widened by sqrt(chi^2 /
dof) (the Birge ratio), so a curved trend does not get a straight line's confidence.
Sizes whose best lr sits at the grid's edge are left out of the trend, which they
would bias, and listed. A transfer predicts upward: a target smaller than the proxies
on any axis is refused (`check_target`, which a transfer sweep also runs before it
trains anything).

Each size's best lr and its bootstrap draws come from lr_fit.best_lr; give each size its
own seed there, so that the sizes' draws are independent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raygpt.errors import UserError
from raygpt.report.transfer.fit import LEVEL, BestLR, num, sci


def log_linear_fit(
    design: np.ndarray, fits: Sequence[BestLR]
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """ln(best lr) = design @ theta by weighted least squares, and refitted on every draw.

    design: (sizes, parameters). Returns theta, its draws (n_boot, parameters), widened
    by the Birge ratio where the sizes scatter more than their intervals allow, and the
    reduced chi^2 (None without residual degrees of freedom).
    """
    draws = np.stack([f.draws for f in fits], axis=1)  # (n_boot, sizes)
    if len({f.draws.shape for f in fits}) != 1:
        raise ValueError("every size's BestLR needs the same number of draws (n_boot)")
    y = np.log([f.lr for f in fits])
    weights = 1.0 / np.array([f.log_sd for f in fits]) ** 2
    sw = np.sqrt(weights)
    a = design * sw[:, None]
    pinv = np.linalg.pinv(a)
    theta = pinv @ (y * sw)
    theta_draws = (draws * sw[None, :]) @ pinv.T
    dof = len(fits) - design.shape[1]
    scatter = None
    if dof > 0:
        resid = y - design @ theta
        scatter = float(np.sum(weights * resid**2) / dof)
        if scatter > 1:
            theta_draws = theta + math.sqrt(scatter) * (theta_draws - theta)
    return theta, theta_draws, scatter


def interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


@dataclass(frozen=True)
class Trend:
    """ln(best lr) = intercept + sum_j slopes[j] ln(size_j), and its prediction at a target."""

    axes: tuple[str, ...]  # the size keys that vary among the proxies, fitted
    slopes: dict[str, float]
    slope_intervals: dict[str, tuple[float, float]]
    intercept: float  # ln(best lr) where every fitted size is 1
    target: dict[str, float]
    lr: float  # predicted at the target
    low: float
    high: float
    level: float
    extrapolation: dict[str, float]  # target / largest proxy, per fitted axis
    sizes: tuple[dict[str, float], ...]  # the proxies fitted
    best: tuple[BestLR, ...]  # their best lrs
    excluded: tuple[tuple[dict[str, float], str], ...]  # proxies left out, and why
    scatter: float | None  # reduced chi^2 of the fit; None without spare sizes
    notes: tuple[str, ...]
    draws: np.ndarray = field(repr=False, compare=False)  # ln(lr at the target), per draw

    def describe(self) -> str:
        target = ", ".join(f"{k}={num(v)}" for k, v in self.target.items())
        slopes = ", ".join(
            f"k[{a}] {self.slopes[a]:+.2f} "
            f"({self.slope_intervals[a][0]:+.2f}..{self.slope_intervals[a][1]:+.2f})"
            for a in self.axes
        )
        return (
            f"lr {sci(self.lr)} ({self.level:.0%} interval {sci(self.low)} to {sci(self.high)}) "
            f"for {target}, from {len(self.sizes)} proxies; slope {slopes}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": list(self.axes),
            "slopes": self.slopes,
            "slope_intervals": {k: list(v) for k, v in self.slope_intervals.items()},
            "intercept": self.intercept,
            "target": self.target,
            "lr": self.lr,
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "extrapolation": self.extrapolation,
            "sizes": [dict(s) for s in self.sizes],
            "best": [b.to_dict() for b in self.best],
            "excluded": [{"size": dict(s), "reason": r} for s, r in self.excluded],
            "scatter": self.scatter,
            "notes": list(self.notes),
        }


def _sizes_text(sizes: Iterable[Mapping[str, float]]) -> str:
    return "; ".join(", ".join(f"{k}={num(v)}" for k, v in s.items()) for s in sizes)


def check_target(sizes: Sequence[Mapping[str, float]], target: Mapping[str, float]) -> None:
    """Refuse a target smaller than the proxies on any of its keys: a transfer predicts
    upward, from small proxies to a larger model. Every key of `target` must be in every
    size."""
    for key in target:
        values = [float(s[key]) for s in sizes]
        if values and float(target[key]) < min(values):
            raise UserError(
                f"target {key}={num(target[key])} is smaller than the proxies "
                f"({num(min(values))}..{num(max(values))}); a transfer predicts upward"
            )


def fit_trend(
    sizes: Sequence[Mapping[str, float]],
    fits: Sequence[BestLR],
    target: Mapping[str, float],
    *,
    level: float = LEVEL,
    label: str = "",
) -> Trend:
    """The trend of the best lr across proxy sizes, and its prediction at `target`.

    sizes[i] (e.g. {"n_embd": 64, "n_layer": 2}) is the size whose best lr is fits[i];
    every key of `target` must be in every size. The axes fitted are the target's keys
    whose values vary among the proxies kept (those whose best lr is not at the grid's
    edge). Raises UserError for a target smaller than the proxies on any axis, fewer
    kept sizes than the fit has parameters, or axes that vary together.
    """
    if len(sizes) != len(fits):
        raise ValueError(f"{len(sizes)} sizes but {len(fits)} fits")
    prefix = f"{label}: " if label else ""
    keys = tuple(target)
    if not keys:
        raise ValueError("target names no size")
    for s in sizes:
        missing = [k for k in keys if k not in s]
        if missing:
            raise ValueError(f"size {dict(s)} lacks {missing}")
    check_target(sizes, target)
    kept = [(dict(s), f) for s, f in zip(sizes, fits, strict=True) if f.edge is None]
    excluded = tuple(
        (dict(s), f"best lr at the grid's {f.edge} point")
        for s, f in zip(sizes, fits, strict=True)
        if f.edge is not None
    )
    axes = tuple(k for k in keys if len({s[k] for s, _ in kept}) > 1)
    if len(kept) < len(axes) + 1 or not axes:
        shown = (
            f"; left out at the grid's edge: {_sizes_text(s for s, _ in excluded)}"
            if excluded
            else ""
        )
        raise UserError(
            f"{prefix}{len(kept)} proxy size(s) with an interior best lr "
            f"({_sizes_text(s for s, _ in kept) or 'none'})"
            f"{shown}; a trend over {', '.join(keys)} needs at least {max(len(axes), 1) + 1}: "
            "widen the learning-rate grid or add sizes"
        )
    design = np.column_stack([np.ones(len(kept))] + [np.log([s[a] for s, _ in kept]) for a in axes])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise UserError(
            f"{prefix}{' and '.join(axes)} vary together across the proxies: their effects on the "
            "best lr cannot be told apart; vary one at a time"
        )
    theta, theta_draws, scatter = log_linear_fit(design, [f for _, f in kept])
    at = np.array([1.0] + [math.log(float(target[a])) for a in axes])
    pred_draws = theta_draws @ at
    low, high = interval(pred_draws, level)
    notes = []
    extrapolation = {}
    for a in axes:
        top = max(s[a] for s, _ in kept)
        extrapolation[a] = float(target[a]) / top
        if extrapolation[a] > 1:
            notes.append(
                f"predicts {a}={num(target[a])} at {extrapolation[a]:.1f}x the largest proxy fitted"
            )
    for k in keys:
        if k not in axes and any(float(target[k]) != s[k] for s, _ in kept):
            notes.append(
                f"{k} is {num(kept[0][0][k])} at every proxy: the trend cannot see it, so the "
                f"prediction for {k}={num(target[k])} assumes it has no effect"
            )
    if excluded:
        notes.append(f"left out, best lr at the grid's edge: {_sizes_text(s for s, _ in excluded)}")
    if scatter is not None and scatter > 1:
        notes.append(
            f"the sizes scatter about the line {math.sqrt(scatter):.1f}x more than their "
            "intervals allow: intervals widened by that"
        )
    return Trend(
        axes=axes,
        slopes={a: float(theta[i + 1]) for i, a in enumerate(axes)},
        slope_intervals={a: interval(theta_draws[:, i + 1], level) for i, a in enumerate(axes)},
        intercept=float(theta[0]),
        target={k: float(v) for k, v in target.items()},
        lr=math.exp(float(theta @ at)),
        low=math.exp(low),
        high=math.exp(high),
        level=level,
        extrapolation=extrapolation,
        sizes=tuple(s for s, _ in kept),
        best=tuple(f for _, f in kept),
        excluded=excluded,
        scatter=scatter,
        notes=tuple(notes),
        draws=pred_draws,
    )
