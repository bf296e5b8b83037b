"""The PNGs of a sweep or run folder: lr_sensitivity.png, loss_curves.png, throughput.png.

Drawn from the tables tables.py reads; each is written whole through the
folder's storage (local or object store).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from raygpt import results, status, storage
from raygpt.config.choices import OPTIMIZERS
from raygpt.report import comparisons
from raygpt.report.tables import evals_by_trial, finite, trial_groups, trial_rows
from raygpt.storage import Storage

PLOT_FILES = ("lr_sensitivity.png", "loss_curves.png", "throughput.png")
DPI = 120


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_PALETTE = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


def optimizer_color(optimizer: str) -> str:
    """The same color for an optimizer in every plot and every report."""
    if optimizer in OPTIMIZERS:
        return _PALETTE[OPTIMIZERS.index(optimizer) % len(_PALETTE)]
    return _PALETTE[(len(OPTIMIZERS) + sum(map(ord, optimizer))) % len(_PALETTE)]


PlotTarget = str | Path | tuple[Storage, str]


def _save(fig, target: PlotTarget) -> Path | str:
    """Save a figure as PNG (written whole: never half a file) and close it.

    `target` is a local path, or (storage, path inside it) for a folder on
    object storage; returns the local Path, or the URI written.
    """
    plt = _pyplot()
    if isinstance(target, tuple):
        store, fs_path = target
    else:
        local = Path(target).expanduser().resolve()
        store, fs_path = storage.resolve(str(local.parent), check=False), str(local)
    try:
        results.write_png(store, fs_path, fig, DPI)
    finally:
        plt.close(fig)
    return Path(fs_path) if store.is_local else store.display(fs_path)


def _title(kind: str, name: str | None) -> str:
    return f"{kind} — {name}" if name else kind


def _tick(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _robust_top(values: np.ndarray) -> float:
    """Upper y-limit that ignores a few absurd values (far above the bulk of the data)."""
    lo, med = float(values.min()), float(np.median(values))
    cap = med + 4 * max(med - lo, 0.05 * abs(med), 1e-9)
    kept = values[values <= cap]
    return float(kept.max()) if len(kept) else med


MAX_BUDGET_PANELS = 3


def plot_lr_sensitivity(
    trials: pa.Table,
    path: PlotTarget,
    name: str | None = None,
    steps: pa.Table | None = None,
) -> Path | str:
    """Val loss against learning rate (log x), one series per optimizer, one panel per
    budget: the largest steps at which trials were compared (ASHA's rungs, max_steps).

    Equal budget: a panel holds only the trials that reached its step, each at its val
    at that step, so a trial stopped at a rung is never drawn beside completed ones as
    if it had trained as long. With seeds, a point is a configuration's mean with its
    sd as an error bar. Diverged trials are crosses along the top of the last panel.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    rows = trial_rows(trials)
    vals = comparisons.val_at_steps(rows, evals_by_trial(steps))
    budgets = comparisons.budgets(rows, vals)[-MAX_BUDGET_PANELS:]
    panels = max(1, len(budgets))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 1.5, 4.8), squeeze=False)
    try:
        all_lrs = [
            r["learning_rate"]
            for r in rows
            if finite(r.get("learning_rate")) and r["learning_rate"] > 0
        ]
        optimizers = sorted({r["optimizer"] for r in rows})
        diverged = [r for r in rows if r["status"] == status.DIVERGED and r["learning_rate"]]
        for ax, step in zip(axes[0], budgets or [None], strict=False):
            ax.set_xscale("log")
            if all_lrs:
                # Before anything is drawn: a lone point would first autoscale the axis
                # to a zero-width range, which matplotlib warns about.
                lo_x, hi_x = min(all_lrs), max(all_lrs)
                pad = 10 ** (0.15 * max(math.log10(hi_x / lo_x), 1.0))
                ax.set_xlim(lo_x / pad, hi_x * pad)
            ranked = comparisons.at_budget(rows, vals, step) if step is not None else []
            values = np.array([c.mean for c in ranked], dtype=float)
            if len(values):
                lo, hi = float(values.min()), _robust_top(values)
                span = max(hi - lo, 0.02 * max(abs(hi), 1.0))
                ax.set_ylim(lo - 0.12 * span, hi + 0.18 * span)
            for opt in optimizers:
                color = optimizer_color(opt)
                mine = sorted(
                    (c for c in ranked if c.optimizer == opt and finite(c.learning_rate)),
                    key=lambda c: c.learning_rate,
                )
                if not mine:
                    continue
                ax.errorbar(
                    [c.learning_rate for c in mine],
                    [c.mean for c in mine],
                    yerr=[c.sd or 0.0 for c in mine],
                    fmt="-o",
                    color=color,
                    ms=6,
                    lw=1.5,
                    capsize=3,
                    alpha=0.9,
                )
            if ranked and finite(ranked[0].learning_rate):
                b = ranked[0]
                ax.plot(b.learning_rate, b.mean, "*", ms=16, color="gold", mec="black", zorder=5)
            if step == (budgets[-1] if budgets else None):
                for k, r in enumerate(diverged):
                    ax.plot(
                        r["learning_rate"],
                        0.97 - 0.05 * (k % 3),
                        "x",
                        color=optimizer_color(r["optimizer"]),
                        ms=9,
                        mew=2.2,
                        transform=ax.get_xaxis_transform(),
                        clip_on=False,
                    )
            ax.set_title(f"step {step}: {len(ranked)} config(s)" if step else "no trials yet")
            ax.set_xlabel("learning rate (log scale)")
            ax.grid(True, which="major", alpha=0.35)
        axes[0][0].set_ylabel("val loss at that step (mean ± sd over seeds)")
        handles = [
            Line2D([], [], color=optimizer_color(o), marker="o", lw=1.5, label=o)
            for o in optimizers
        ]
        if diverged:
            handles.append(Line2D([], [], ls="", marker="x", color="0.35", mew=2, label="diverged"))
        handles.append(
            Line2D([], [], ls="", marker="*", ms=12, color="gold", mec="black", label="best")
        )
        axes[0][-1].legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)
        fig.suptitle(_title("Learning-rate sensitivity at equal budget", name))
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def plot_loss_curves(steps: pa.Table, path: PlotTarget, name: str | None = None) -> Path | str:
    """Val loss at eval steps per trial, colored by optimizer; train loss faint behind."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    groups = trial_groups(steps)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    try:
        light = len(groups) > 12  # many trials: thinner, lighter lines
        everything, starts = [], []
        for g in groups:
            c, color = g["cols"], optimizer_color(g["optimizer"])
            train = _finite_or_nan(c["train_loss"])
            ax.plot(c["step"], train, "-", color=color, lw=0.7, alpha=0.15, zorder=1)
            mask = c["val_valid"]
            val = _finite_or_nan(c["val_loss"][mask])
            ax.plot(
                c["step"][mask],
                val,
                "-o",
                color=color,
                lw=1.0 if light else 1.5,
                ms=2.5 if light else 4,
                alpha=0.6 if light else 0.9,
                zorder=2,
            )
            for series in (train, val):
                everything.append(series[np.isfinite(series)])
            # The first train loss is that of an untrained model; a trial's first eval may
            # already be diverging, so it does not count.
            first = train[np.isfinite(train)][:1]
            if len(first):
                starts.append(float(first[0]))
        values = np.concatenate(everything) if everything else np.array([])
        if len(values):
            lo = float(values.min())
            # Curves start near the loss of an untrained model: anything far above is divergence.
            hi = min(float(values.max()), 1.15 * max(starts)) if starts else float(values.max())
            span = max(hi - lo, 0.05)
            ax.set_ylim(lo - 0.05 * span, hi + 0.05 * span)
        optimizers = sorted({g["optimizer"] for g in groups})
        handles = [
            Line2D([], [], color=optimizer_color(o), marker="o", ms=4, label=o) for o in optimizers
        ]
        if handles:
            handles.append(Line2D([], [], color="0.3", marker="o", ms=4, label="val loss (evals)"))
            handles.append(Line2D([], [], color="0.3", alpha=0.25, label="train loss"))
            ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
        else:
            ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
        n = len(groups)
        ax.set_title(_title(f"Loss curves ({n} trial{'s' if n != 1 else ''})", name))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.35)
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


def plot_throughput(steps: pa.Table, path: PlotTarget, name: str | None = None) -> Path | str:
    """Tokens/s against step per trial; MFU in a second panel when any MFU is known."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    groups = trial_groups(steps)
    has_mfu = any(np.isfinite(g["cols"]["mfu"]).any() for g in groups)
    if has_mfu:
        fig, (ax, ax_mfu) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax_mfu = None
    try:
        alpha = 0.45 if len(groups) > 12 else 0.8
        tps_all, mfu_all = [], []
        for g in groups:
            c, color = g["cols"], optimizer_color(g["optimizer"])
            tps = _finite_or_nan(c["tokens_per_sec"])
            ax.plot(c["step"], tps, "-", color=color, lw=0.9, alpha=alpha)
            tps_all.append(tps[np.isfinite(tps)])
            if ax_mfu is not None:
                m = _finite_or_nan(c["mfu"]) * 100
                ax_mfu.plot(c["step"], m, "-", color=color, lw=0.9, alpha=alpha)
                mfu_all.append(m[np.isfinite(m)])
        for axis, parts in ((ax, tps_all), (ax_mfu, mfu_all)):
            values = np.concatenate(parts) if parts else np.array([])
            if axis is not None and len(values):
                # The first steps (compilation, warm-up) and rare spikes should not set the scale.
                top = min(float(values.max()), 3 * float(np.median(values)))
                axis.set_ylim(0, max(top * 1.1, 1e-9))
        ax.set_ylabel("tokens/s (per trial)")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: _tick(v)))
        ax.grid(True, alpha=0.35)
        optimizers = sorted({g["optimizer"] for g in groups})
        handles = [Line2D([], [], color=optimizer_color(o), label=o) for o in optimizers]
        if handles:
            ax.legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.9)
        else:
            ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(_title("Throughput", name))
        if ax_mfu is not None:
            ax_mfu.set_ylabel("MFU (%)")
            ax_mfu.grid(True, alpha=0.35)
            ax_mfu.set_xlabel("step")
        else:
            ax.set_xlabel("step")
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)
