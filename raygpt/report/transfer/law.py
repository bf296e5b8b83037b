"""A learning-rate law from your own trials: best lr = a * N^alpha * D^beta, per optimizer.

The trials come with their N (non-embedding parameters) and D (tokens each was set to
train) from law_rows.py; the law's files (lr_law.json, lr_law.png) are law_outputs.py's.

Method, per optimizer: the trials of each (N, D) are one curve, whose best lr and
interval come from `lr_fit.best_lr` (a parabola in ln lr, bootstrapped over seeds).
Curves with fewer than 3 usable learning rates, and curves whose best lr is at the
grid's edge, are left out and listed. Then ln(best lr) = ln a + alpha ln(N / 1e6) +
beta ln(D / 1e8) by weighted least squares (`lr_trend.log_linear_fit`), refitted on
every bootstrap draw of every curve's best lr: the 90% intervals on a, alpha and beta
carry each curve's own interval. a is the best lr at N = 1e6 and D = 1e8, where it is
less tied to the exponents than at N = D = 1.

An exponent is fitted only where its variable varies: with one N, alpha is fixed at 0
and the law says "N was not varied" (likewise D and beta). N and D that vary only
together (D proportional to a power of N) cannot be told apart and are refused.

A law holds where it was fitted: `Law.predict` refuses N or D more than `max_factor`
(4x) outside the fitted range unless `extrapolate=True`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raygpt.errors import UserError
from raygpt.report.compute import fmt_count
from raygpt.report.transfer import fit as lr_fit
from raygpt.report.transfer.fit import LEVEL, LOSS_KEY, N_BOOT, WINDOW, BestLR, sci
from raygpt.report.transfer.trend import interval, log_linear_fit

N_REF = 1e6
D_REF = 1e8
MAX_FACTOR = 4.0


# --------------------------------------------------------------------------- the law


@dataclass(frozen=True)
class LawPoint:
    """One curve: the best lr of the trials at one (N, D)."""

    N: int
    D: int
    best: BestLR

    def to_dict(self) -> dict[str, Any]:
        return {"N": self.N, "D": self.D, "best": self.best.to_dict()}


@dataclass(frozen=True)
class Prediction:
    optimizer: str
    N: float
    D: float
    lr: float
    low: float
    high: float
    level: float
    factor_n: float  # how far outside the fitted N range (1: inside)
    factor_d: float
    extrapolated: bool  # beyond max_factor, with extrapolate=True
    notes: tuple[str, ...]

    def line(self) -> str:
        beyond = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (
            f"{self.optimizer}: predicted lr {sci(self.lr)} ({self.level:.0%}: {sci(self.low)}.."
            f"{sci(self.high)}) at N {fmt_count(self.N)}, D {sci(self.D)} tokens{beyond}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


def _factor(value: float, lo: float, hi: float) -> float:
    return max(value / hi, lo / value, 1.0)


@dataclass(frozen=True)
class Law:
    """best lr = a * (N / N_REF)^alpha * (D / D_REF)^beta for one optimizer."""

    optimizer: str
    a: float  # the best lr at N = N_REF, D = D_REF
    alpha: float
    beta: float
    a_interval: tuple[float, float]
    alpha_interval: tuple[float, float] | None  # None: fixed at 0, N was not varied
    beta_interval: tuple[float, float] | None  # None: fixed at 0, D was not varied
    level: float
    n_range: tuple[int, int]
    d_range: tuple[int, int]
    points: tuple[LawPoint, ...]  # the curves fitted
    excluded: tuple[tuple[int, int, str], ...]  # (N, D, why) of curves left out
    scatter: float | None  # reduced chi^2 of the fit; None without spare curves
    max_factor: float
    notes: tuple[str, ...]
    draws: np.ndarray = field(repr=False, compare=False)  # (n_boot, 3): ln a, alpha, beta

    def predict(
        self, N: float | None = None, D: float | None = None, *, extrapolate: bool = False
    ) -> Prediction:
        """The law's best lr at (N, D) with its interval. An axis the law did not vary
        defaults to its one fitted value. Raises UserError beyond max_factor outside the
        fitted range unless `extrapolate`."""
        values = {}
        for name, value, (lo, hi) in (("N", N, self.n_range), ("D", D, self.d_range)):
            if value is None:
                if lo != hi:
                    raise UserError(
                        f"{self.optimizer}: give {name}: the law varies with it "
                        f"({self._range(name)})"
                    )
                value = lo
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise UserError(f"{name}={value!r} must be a positive number")
            values[name] = float(value)
        notes = []
        factors = {}
        for name, (lo, hi) in (("N", self.n_range), ("D", self.d_range)):
            factor = _factor(values[name], lo, hi)
            factors[name] = factor
            shown = fmt_count(values[name]) if name == "N" else sci(values[name])
            if factor > self.max_factor and not extrapolate:
                raise UserError(
                    f"{self.optimizer}: {name}={shown} is {factor:.0f}x outside the range the law "
                    f"was fitted on ({self._range(name)}); it predicts within {self.max_factor:g}x "
                    "of it: pass --extrapolate (extrapolate=True) to predict anyway"
                )
            if factor > 1:
                notes.append(f"{name} {factor:.1f}x outside the fitted range")
            if lo == hi and values[name] != lo:
                exponent = "alpha" if name == "N" else "beta"
                notes.append(f"{exponent} is fixed at 0: {name} was not varied")
        x = np.array([1.0, math.log(values["N"] / N_REF), math.log(values["D"] / D_REF)])
        theta = np.array([math.log(self.a), self.alpha, self.beta])
        low, high = interval(self.draws @ x, self.level)
        return Prediction(
            optimizer=self.optimizer,
            N=values["N"],
            D=values["D"],
            lr=math.exp(float(theta @ x)),
            low=math.exp(low),
            high=math.exp(high),
            level=self.level,
            factor_n=factors["N"],
            factor_d=factors["D"],
            extrapolated=max(factors.values()) > self.max_factor,
            notes=tuple(notes),
        )

    def _range(self, name: str) -> str:
        if name == "N":
            lo, hi = self.n_range
            return f"N {fmt_count(lo)}..{fmt_count(hi)}"
        lo, hi = self.d_range
        return f"D {sci(lo)}..{sci(hi)} tokens"

    def line(self) -> str:
        """One line: the law, its intervals and where it was fitted."""
        parts = [f"a {sci(self.a_interval[0])}..{sci(self.a_interval[1])}"]
        for sym, iv, var in (("α", self.alpha_interval, "N"), ("β", self.beta_interval, "D")):
            if iv is None:
                parts.append(f"{sym} fixed at 0: {var} was not varied")
            else:
                parts.append(f"{sym} {iv[0]:.2f}..{iv[1]:.2f}")
        return (
            f"{self.optimizer}: lr = {sci(self.a)} · (N/{sci(N_REF, 1)})^{self.alpha:.2f} · "
            f"(D/{sci(D_REF, 1)})^{self.beta:.2f} ({self.level:.0%}: {', '.join(parts)}; fitted on "
            f"{self._range('N')}, {self._range('D')}, {len(self.points)} sizes"
            + (f", {len(self.excluded)} left out" if self.excluded else "")
            + ")"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "law": "lr = a * (N / N_ref)^alpha * (D / D_ref)^beta",
            "N_ref": N_REF,
            "D_ref": D_REF,
            "a": self.a,
            "alpha": self.alpha,
            "beta": self.beta,
            "a_interval": list(self.a_interval),
            "alpha_interval": list(self.alpha_interval) if self.alpha_interval else None,
            "beta_interval": list(self.beta_interval) if self.beta_interval else None,
            "level": self.level,
            "n_range": list(self.n_range),
            "d_range": list(self.d_range),
            "max_factor": self.max_factor,
            "points": [p.to_dict() for p in self.points],
            "excluded": [{"N": n, "D": d, "reason": r} for n, d, r in self.excluded],
            "scatter": self.scatter,
            "notes": list(self.notes),
            "line": self.line(),
        }


def _seed(seed: int, *path: int) -> int:
    """An independent stream per curve: curves that shared one would share their draws."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


def fit_law(
    rows: Iterable[Mapping[str, Any]],
    optimizer: str,
    *,
    loss_key: str = LOSS_KEY,
    window: int = WINDOW,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    max_factor: float = MAX_FACTOR,
) -> Law:
    """The law of one optimizer over rows with N and D (law_rows); UserError when its
    curves cannot give one (fewer than 2 usable sizes, N and D varied together, or
    parametrizations mixed)."""
    mine = [r for r in rows if r.get("optimizer") == optimizer]
    kinds = sorted({str(r.get("parametrization") or "sp") for r in mine})
    if len(kinds) > 1:
        raise UserError(
            f"{optimizer}: the trials mix parametrizations {', '.join(kinds)}; the best lr means "
            "something else under each: fit a law on the sweeps of one"
        )
    curves: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for r in mine:
        curves.setdefault((int(r["N"]), int(r["D"])), []).append(r)
    points, excluded, notes = [], [], []
    for i, ((n, d), curve) in enumerate(sorted(curves.items())):
        found = lr_fit.usable_trials(curve, loss_key).get(optimizer)
        label = f"{optimizer} at N {fmt_count(n)}, D {sci(d)}"
        if not found:
            excluded.append((n, d, "no completed trial"))
            continue
        try:
            best = lr_fit.best_lr(
                *found, window=window, n_boot=n_boot, level=level, seed=_seed(seed, i), label=label
            )
        except UserError as err:
            excluded.append((n, d, str(err).removeprefix(f"{label}: ")))
            continue
        if best.edge is not None:
            excluded.append((n, d, f"best lr at the grid's {best.edge} point {sci(best.lr)}"))
            continue
        if len({r.get("other") for r in curve}) > 1:
            notes.append(
                f"at N {fmt_count(n)}, D {sci(d)} other searched keys vary: the curve "
                "averages over them"
            )
        points.append(LawPoint(N=n, D=d, best=best))
    n_values = sorted({p.N for p in points})
    d_values = sorted({p.D for p in points})
    vary_n, vary_d = len(n_values) > 1, len(d_values) > 1
    if not (vary_n or vary_d):
        shown = f" (N {fmt_count(points[0].N)}, D {sci(points[0].D)})" if points else ""
        left = f"; left out: {len(excluded)} ({excluded[0][2]})" if excluded else ""
        raise UserError(
            f"{optimizer}: {len(points)} size(s) with an interior best lr{shown}{left}; a law "
            "needs at least 2: sweep other n_embd, n_layer or max_steps"
        )
    columns = [np.ones(len(points))]
    if vary_n:
        columns.append(np.log([p.N / N_REF for p in points]))
    if vary_d:
        columns.append(np.log([p.D / D_REF for p in points]))
    design = np.column_stack(columns)
    if len(points) < design.shape[1] or np.linalg.matrix_rank(design) < design.shape[1]:
        raise UserError(
            f"{optimizer}: N and D vary together across the {len(points)} sizes fitted, so "
            "their exponents cannot be told apart: add sweeps that vary one alone"
        )
    theta, theta_draws, scatter = log_linear_fit(design, [p.best for p in points])
    full = np.zeros(3)
    full_draws = np.zeros((theta_draws.shape[0], 3))
    slots = [0] + ([1] if vary_n else []) + ([2] if vary_d else [])
    full[slots] = theta
    full_draws[:, slots] = theta_draws
    if not vary_n:
        notes.append("alpha is fixed at 0: N was not varied")
    if not vary_d:
        notes.append("beta is fixed at 0: D was not varied")
    if scatter is not None and scatter > 1:
        notes.append(
            f"the sizes scatter about the law {math.sqrt(scatter):.1f}x more than their intervals "
            "allow: intervals widened by that"
        )
    lo_a, hi_a = interval(full_draws[:, 0], level)
    return Law(
        optimizer=optimizer,
        a=math.exp(full[0]),
        alpha=float(full[1]),
        beta=float(full[2]),
        a_interval=(math.exp(lo_a), math.exp(hi_a)),
        alpha_interval=interval(full_draws[:, 1], level) if vary_n else None,
        beta_interval=interval(full_draws[:, 2], level) if vary_d else None,
        level=level,
        n_range=(n_values[0], n_values[-1]),
        d_range=(d_values[0], d_values[-1]),
        points=tuple(points),
        excluded=tuple(excluded),
        scatter=scatter,
        max_factor=max_factor,
        notes=tuple(notes),
        draws=full_draws,
    )


def fit_laws(
    rows: Iterable[Mapping[str, Any]],
    *,
    loss_key: str = LOSS_KEY,
    window: int = WINDOW,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    max_factor: float = MAX_FACTOR,
) -> tuple[dict[str, Law], dict[str, str]]:
    """A law per optimizer over rows from law_rows: (laws, {optimizer: why not fitted}).

    Raises UserError when no optimizer gets a law (the first reason)."""
    rows = list(rows)
    laws, skipped = {}, {}
    for i, opt in enumerate(sorted({str(r.get("optimizer")) for r in rows})):
        try:
            laws[opt] = fit_law(
                rows,
                opt,
                loss_key=loss_key,
                window=window,
                n_boot=n_boot,
                level=level,
                seed=_seed(seed, i),
                max_factor=max_factor,
            )
        except UserError as err:
            skipped[opt] = str(err).removeprefix(f"{opt}: ")
    if not laws:
        if not skipped:
            raise UserError("the sweeps hold no trials")
        opt, why = next(iter(skipped.items()))
        raise UserError(f"no learning-rate law: {opt}: {why}")
    return laws, skipped
