"""`python -m raygpt.report SWEEP_DIR`: which optimizer, at which learning rate?

Reads only the Parquet files a sweep (or a single `raygpt.train` run) leaves in
`<storage>/<name>/`, a local folder or an s3:// or gs:// URI: `trials.parquet`
(one row per trial) and the step parts (one row per trial and step; see
results.py). No Ray import, so it runs anywhere the files are, also while a
sweep is still writing them: every file is written whole, and a missing one
just means "nothing yet".

Prints a fixed-width summary (best learning rate per optimizer, status counts,
compute spent) and writes three plots beside the files (or into `--out`):
`lr_sensitivity.png`, `loss_curves.png` and `throughput.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raygpt import metrics, results, status, storage
from raygpt.config import OPTIMIZERS
from raygpt.errors import UserError, exit_on_user_error
from raygpt.storage import Storage

PLOT_FILES = ("lr_sensitivity.png", "loss_curves.png", "throughput.png")
DPI = 120


# --------------------------------------------------------------------------- loading


def folder_storage(where: str | Path | Storage) -> Storage:
    """The storage rooted at a sweep or run folder (a path, a URI, or a Storage already)."""
    if isinstance(where, Storage):
        return where
    store = storage.resolve(str(where), check=False)
    if store.root.endswith(".parquet"):  # someone passed trials.parquet or a part itself
        parent = store.root.rsplit("/", 1)[0]
        if parent.endswith(f"/{results.STEPS_DIR}"):
            parent = parent.rsplit("/", 1)[0]
        store = store.at(parent)
    return store


def load(where: str | Path | Storage) -> tuple[pa.Table | None, pa.Table | None, dict[str, Any]]:
    """Read a sweep folder (or a train run folder): (trials, steps, metadata).

    A run folder has only step parts; its trials table is then derived from
    the steps (one row per trial_id, "" for a plain run). The metadata is the
    decoded `raygpt.*` Parquet metadata of both (trials' wins), plus "name":
    the sweep or run name.
    """
    store = folder_storage(where)
    hint = "give a sweep or run folder (<storage>/<name>) that holds trials.parquet or steps/"
    shown = store.display()
    metadata: dict[str, Any] = {}
    try:
        if not store.is_dir(store.root):
            raise UserError(f"no such folder: {shown}; {hint}")
        steps, steps_meta = results.read_steps(store, store.root)
        metadata.update(steps_meta)
        trials = results.read_table(store, f"{store.root}/{results.TRIALS_FILE}")
        if trials is not None:
            metadata.update(results.decode_metadata(trials.schema))
            trials = results.conform(trials, results.TRIAL_SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot read {shown}: {str(err).splitlines()[0]}") from None
    if trials is None and steps is None:
        raise UserError(f"no {results.TRIALS_FILE} or step parts in {shown} (yet?); {hint}")
    metadata["has_trials_file"] = trials is not None
    if trials is None:
        trials = derive_trials(steps, metadata)
    metadata["name"] = _name(metadata, store.root)
    return trials, steps, metadata


def _name(metadata: dict[str, Any], root: str) -> str:
    for key in ("sweep", "config"):
        section = metadata.get(key)
        if isinstance(section, dict) and section.get("name"):
            return str(section["name"])
    return root.rstrip("/").rsplit("/", 1)[-1]


def _columns(table: pa.Table, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns as numpy arrays: floats and ints as float64 with NaN for null, strings as str."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = np.array(
                [v if v is not None else "" for v in col.to_pylist()], dtype=object
            )
        else:
            out[name] = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def _trial_groups(steps: pa.Table | None) -> list[dict[str, Any]]:
    """Steps split per trial, each sorted by step: [{trial_id, optimizer, learning_rate, cols}]."""
    if steps is None or len(steps) == 0:
        return []
    names = tuple(results.STEP_COLUMNS)
    cols = _columns(steps, names)
    val_valid = pc.is_valid(steps.column("val_loss")).to_numpy(zero_copy_only=False)
    cols["val_valid"] = np.asarray(val_valid, dtype=bool)
    trial_ids = cols["trial_id"]
    groups = []
    for trial_id in sorted(set(trial_ids.tolist())):
        idx = np.flatnonzero(trial_ids == trial_id)
        idx = idx[np.argsort(cols["step"][idx], kind="stable")]
        sub = {k: v[idx] for k, v in cols.items()}
        optimizer = next((o for o in sub["optimizer"] if o), "?")
        lrs = sub["learning_rate"][np.isfinite(sub["learning_rate"])]
        groups.append(
            {
                "trial_id": trial_id,
                "run": next((r for r in sub["run"] if r), ""),
                "optimizer": optimizer,
                "learning_rate": float(lrs[0]) if len(lrs) else None,
                "cols": sub,
            }
        )
    return groups


def derive_trials(steps: pa.Table | None, metadata: dict[str, Any] | None = None) -> pa.Table:
    """A trials table (TRIAL_SCHEMA) built from step rows, for folders without trials.parquet.

    Status: "diverged" when a loss is not finite (or, with the run's config at
    hand, the last train loss exceeds divergence_factor x the first), "running"
    when the config's max_steps is not reached yet, else "completed".
    """
    config = (metadata or {}).get("config")
    config = config if isinstance(config, dict) else {}
    max_steps = config.get("max_steps")
    factor = config.get("divergence_factor") or 0
    rows = []
    for group in _trial_groups(steps):
        c = group["cols"]
        train, val = c["train_loss"], c["val_loss"][c["val_valid"]]
        finite_train = train[np.isfinite(train)]
        finite_val = val[np.isfinite(val)]
        last_step = int(np.nanmax(c["step"])) if np.isfinite(c["step"]).any() else 0
        diverged = bool(len(val) and not np.isfinite(val[-1])) or bool(
            len(train) and not np.isfinite(train[-1])
        )
        if factor and len(finite_train) and len(train) and np.isfinite(train[-1]):
            diverged = diverged or train[-1] > factor * finite_train[0]
        trial_status = status.decide(
            errored=False,
            diverged=diverged,
            steps=last_step,
            max_steps=int(max_steps) if isinstance(max_steps, int | float) else None,
            ended=False,
        )
        if len(finite_val):
            best_val = float(finite_val.min())
        else:
            best_val = math.inf if len(val) else None
        step_ms = c["step_time_ms"][np.isfinite(c["step_time_ms"])]
        tps = c["tokens_per_sec"][np.isfinite(c["tokens_per_sec"])]
        mfu = c["mfu"][np.isfinite(c["mfu"])]
        tokens = c["tokens_seen"][np.isfinite(c["tokens_seen"])]
        rows.append(
            {
                "trial_id": group["trial_id"],
                "optimizer": group["optimizer"],
                "learning_rate": group["learning_rate"],
                "status": trial_status,
                "steps": last_step,
                "best_val_loss": best_val,
                "final_train_loss": float(train[-1]) if len(train) else None,
                "final_val_loss": float(val[-1]) if len(val) else None,
                "train_seconds": float(step_ms.sum() / 1000) if len(step_ms) else None,
                "tokens": int(tokens.max()) if len(tokens) else None,
                "mean_tokens_per_sec": float(tps.mean()) if len(tps) else None,
                "mean_mfu": float(mfu.mean()) if len(mfu) else None,
            }
        )
    full = [{name: row.get(name) for name in results.TRIAL_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(full, schema=results.TRIAL_SCHEMA)


# --------------------------------------------------------------------------- summary


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _trial_rows(trials: pa.Table | None) -> list[dict[str, Any]]:
    if trials is None:
        return []
    rows = trials.to_pylist()
    for row in rows:
        row["status"] = row.get("status") or status.RUNNING
        row["optimizer"] = row.get("optimizer") or "?"
    return rows


def _can_win(row: dict[str, Any]) -> bool:
    return row["status"] in status.CAN_WIN and _finite(row.get("best_val_loss"))


def summarize(
    trials: pa.Table | None, steps: pa.Table | None, name: str | None = None
) -> dict[str, Any]:
    """Best learning rate per optimizer, overall best, status counts and compute spent."""
    if trials is None and steps is not None:
        trials = derive_trials(steps)
    rows = _trial_rows(trials)

    per_opt: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = per_opt.setdefault(
            row["optimizer"],
            {
                "optimizer": row["optimizer"],
                "trials": 0,
                "status_counts": Counter(),
                "best_learning_rate": None,
                "best_val_loss": None,
                "best_trial_id": None,
                "best_momentum": None,
            },
        )
        entry["trials"] += 1
        entry["status_counts"][row["status"]] += 1
        if _can_win(row) and (
            entry["best_val_loss"] is None or row["best_val_loss"] < entry["best_val_loss"]
        ):
            entry["best_val_loss"] = float(row["best_val_loss"])
            entry["best_learning_rate"] = row.get("learning_rate")
            entry["best_trial_id"] = row.get("trial_id")
            entry["best_momentum"] = row.get("momentum")
    optimizers = sorted(
        per_opt.values(),
        key=lambda e: (e["best_val_loss"] is None, e["best_val_loss"] or 0.0, e["optimizer"]),
    )
    for entry in optimizers:
        entry["status_counts"] = dict(entry["status_counts"])
        entry["best_at_edge"] = _edge(entry, rows)
    winners = [e for e in optimizers if e["best_val_loss"] is not None]
    best = None
    if winners:
        top = winners[0]
        best = {
            "optimizer": top["optimizer"],
            "learning_rate": top["best_learning_rate"],
            "val_loss": top["best_val_loss"],
            "trial_id": top["best_trial_id"],
            "momentum": top["best_momentum"],
        }
    return {
        "name": name,
        "trials": len(rows),
        "status_counts": dict(Counter(r["status"] for r in rows)),
        "optimizers": optimizers,
        "best": best,
        "compute": _compute(rows, steps),
    }


def _edge(entry: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Which end of the tried learning rates the best one is ("highest", "lowest") or None.

    At an end, the optimum may lie outside the searched range. A larger lr that diverged
    (or a smaller one that learned too slowly) brackets the best, so every trial that
    ran counts; errors say nothing about the learning rate and do not. Needs 3 lrs.
    """
    best = entry["best_learning_rate"]
    tried = {
        float(r["learning_rate"])
        for r in rows
        if r["optimizer"] == entry["optimizer"]
        and r["status"] != status.ERROR
        and _finite(r.get("learning_rate"))
    }
    if not _finite(best) or len(tried) < 3:
        return None
    if best >= max(tried):
        return "highest"
    if best <= min(tried):
        return "lowest"
    return None


def _compute(rows: list[dict[str, Any]], steps: pa.Table | None) -> dict[str, Any]:
    def total(key: str) -> float | None:
        values = [r[key] for r in rows if _finite(r.get(key))]
        return float(sum(values)) if values else None

    def mean(values: np.ndarray) -> float | None:
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else None

    out: dict[str, Any] = {
        "total_steps": None,
        "total_tokens": None,
        "train_seconds": None,
        "wall_seconds": total("wall_seconds"),
        "mean_tokens_per_sec": None,
        "mean_mfu": None,
    }
    if steps is not None and len(steps):
        cols = _columns(steps, ("trial_id", "tokens_seen", "step_time_ms", "tokens_per_sec", "mfu"))
        out["total_steps"] = len(steps)
        per_trial = [
            np.nanmax(cols["tokens_seen"][cols["trial_id"] == t])
            for t in set(cols["trial_id"].tolist())
            if np.isfinite(cols["tokens_seen"][cols["trial_id"] == t]).any()
        ]
        out["total_tokens"] = int(sum(per_trial)) if per_trial else None
        step_ms = cols["step_time_ms"][np.isfinite(cols["step_time_ms"])]
        out["train_seconds"] = float(step_ms.sum() / 1000) if len(step_ms) else None
        out["mean_tokens_per_sec"] = mean(cols["tokens_per_sec"])
        out["mean_mfu"] = mean(cols["mfu"])
    else:
        steps_total = total("steps")
        tokens_total = total("tokens")
        out["total_steps"] = int(steps_total) if steps_total is not None else None
        out["total_tokens"] = int(tokens_total) if tokens_total is not None else None
        out["train_seconds"] = total("train_seconds")
        out["mean_tokens_per_sec"] = mean(
            np.array([r.get("mean_tokens_per_sec") for r in rows], dtype=float)
        )
        out["mean_mfu"] = mean(np.array([r.get("mean_mfu") for r in rows], dtype=float))
    # Fall back on the trials table for what the steps could not tell.
    if out["train_seconds"] is None:
        out["train_seconds"] = total("train_seconds")
    if out["total_tokens"] is None:
        tokens_total = total("tokens")
        out["total_tokens"] = int(tokens_total) if tokens_total is not None else None
    return out


def format_lr(lr: Any) -> str:
    return f"{lr:.3g}" if _finite(lr) else "-"


def _format_loss(loss: Any) -> str:
    return f"{loss:.4f}" if _finite(loss) else "-"


def _human(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _status_list(counts: dict[str, int]) -> list[str]:
    known = [s for s in status.ALL if counts.get(s)]
    return known + sorted(s for s in counts if s not in status.ALL and counts[s])


def format_summary(summary: dict[str, Any]) -> str:
    """A fixed-width table for stdout: optimizers by best loss, status counts, compute."""
    lines = []
    title = f"sweep {summary['name']}" if summary.get("name") else "sweep"
    lines.append(f"{title}: {summary['trials']} trial(s)")
    if not summary["trials"]:
        lines.append("no trials yet")
    statuses = _status_list(summary["status_counts"])
    show_momentum = any(e["best_momentum"] is not None for e in summary["optimizers"])

    header = ["optimizer", "best lr", "best val loss", "trials", *statuses]
    if show_momentum:
        header.insert(2, "momentum")
    table = [header]
    for e in summary["optimizers"]:
        row = [
            e["optimizer"],
            format_lr(e["best_learning_rate"]),
            _format_loss(e["best_val_loss"]),
            str(e["trials"]),
            *(str(e["status_counts"].get(s, 0)) for s in statuses),
        ]
        if show_momentum:
            m = e["best_momentum"]
            row.insert(2, f"{m:.3g}" if _finite(m) else "-")
        table.append(row)
    if summary["optimizers"]:
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines.append("")
        for i, r in enumerate(table):
            cells = [r[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))

    lines.append("")
    counts = summary["status_counts"]
    lines.append("status:   " + (", ".join(f"{counts[s]} {s}" for s in statuses) or "-"))
    best = summary["best"]
    if best:
        extra = f", momentum {best['momentum']:.3g}" if _finite(best.get("momentum")) else ""
        trial = f", trial {best['trial_id']}" if best.get("trial_id") else ""
        lines.append(
            f"best:     {best['optimizer']} at lr {format_lr(best['learning_rate'])}{extra} "
            f"(val loss {_format_loss(best['val_loss'])}{trial})"
        )
    else:
        lines.append("best:     none yet (no finished trial with a finite val loss)")
    for e in summary["optimizers"]:
        edge = e.get("best_at_edge")
        if edge:
            lr = e["best_learning_rate"]
            lines.append(
                f"range:    {e['optimizer']}'s best lr {format_lr(lr)} is the {edge} it tried; "
                f"the optimum may lie {'above' if edge == 'highest' else 'below'}: "
                f"try --lr-range {e['optimizer']}={lr / 10:.3g}:{lr * 10:.3g}"
            )

    c = summary["compute"]
    steps = f"{c['total_steps']:,}" if c["total_steps"] is not None else "n/a"
    train = metrics.format_duration(c["train_seconds"]) if c["train_seconds"] is not None else "n/a"
    wall = metrics.format_duration(c["wall_seconds"]) if c["wall_seconds"] is not None else "n/a"
    tps = f"{c['mean_tokens_per_sec']:,.0f}" if c["mean_tokens_per_sec"] is not None else "n/a"
    mfu = f"{c['mean_mfu'] * 100:.1f}%" if c["mean_mfu"] is not None else "n/a"
    lines.append(
        f"compute:  {steps} steps, {_human(c['total_tokens'])} tokens, "
        f"train {train} (sum of step times), wall {wall} (sum over trials)"
    )
    lines.append(f"          mean {tps} tokens/s per trial, mean MFU {mfu}")
    return "\n".join(lines)


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


def plot_lr_sensitivity(trials: pa.Table, path: PlotTarget, name: str | None = None) -> Path | str:
    """Best val loss against learning rate (log x), one series per optimizer."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    rows = [
        r
        for r in _trial_rows(trials)
        if r["status"] != status.ERROR and _finite(r.get("learning_rate"))
    ]
    rows = [r for r in rows if r["learning_rate"] > 0]
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        plotted = [
            r for r in rows if r["status"] != status.DIVERGED and _finite(r.get("best_val_loss"))
        ]
        diverged = [r for r in rows if r["status"] == status.DIVERGED]
        values = np.array([r["best_val_loss"] for r in plotted], dtype=float)
        if len(values):
            lo, hi = float(values.min()), _robust_top(values)
            span = max(hi - lo, 0.02 * max(abs(hi), 1.0))
            bottom, top = lo - 0.12 * span, hi + 0.18 * span  # headroom for diverged markers
        else:
            bottom, top = 0.0, 1.0
        ax.set_xscale("log")
        ax.set_ylim(bottom, top)

        optimizers = sorted({r["optimizer"] for r in rows})
        styles_used: set[str] = set()
        ceiling = top - 0.06 * (top - bottom)  # where off-scale points are drawn

        def shown(r: dict[str, Any]) -> float:
            return min(r["best_val_loss"], ceiling)

        diverged_at: Counter[float] = Counter()  # stack diverged markers that share an lr
        for opt in optimizers:
            color = optimizer_color(opt)
            points = sorted(
                (r for r in plotted if r["optimizer"] == opt), key=lambda r: r["learning_rate"]
            )
            connected = [r for r in points if r["status"] in status.FINISHED_OK]
            if connected:
                ax.plot(
                    [r["learning_rate"] for r in connected],
                    [shown(r) for r in connected],
                    "-",
                    color=color,
                    lw=1.6,
                    alpha=0.85,
                    zorder=2,
                )
            for r in points:
                hollow = r["status"] != status.COMPLETED
                marker = "D" if r["status"] == status.RUNNING else "o"
                styles_used.add(r["status"] if r["status"] in status.CAN_WIN else status.COMPLETED)
                off_scale = r["best_val_loss"] > ceiling
                if off_scale:
                    styles_used.add("off_scale")
                ax.plot(
                    r["learning_rate"],
                    shown(r),
                    "^" if off_scale else marker,
                    ms=7,
                    mfc="white" if hollow else color,
                    mec=color,
                    mew=1.6,
                    zorder=3,
                )
            for r in (d for d in diverged if d["optimizer"] == opt):
                level = diverged_at[r["learning_rate"]]
                diverged_at[r["learning_rate"]] += 1
                ax.plot(
                    r["learning_rate"],
                    0.97 - 0.06 * level,
                    "x",
                    color=color,
                    ms=9,
                    mew=2.2,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    zorder=4,
                )

        summary = summarize(trials, None)
        if summary["best"] and _finite(summary["best"]["learning_rate"]):
            b = summary["best"]
            ax.plot(
                b["learning_rate"], b["val_loss"], "*", ms=18, color="gold", mec="black", zorder=5
            )
            ax.annotate(
                f"best: {b['optimizer']} lr {format_lr(b['learning_rate'])} -> {b['val_loss']:.4f}",
                (b["learning_rate"], b["val_loss"]),
                xytext=(10, -16),
                textcoords="offset points",
                fontsize=9,
            )

        all_lrs = [r["learning_rate"] for r in rows]
        if all_lrs:
            lo_x, hi_x = min(all_lrs), max(all_lrs)
            pad = 10 ** (0.15 * max(math.log10(hi_x / lo_x), 1.0))
            ax.set_xlim(lo_x / pad, hi_x * pad)

        handles = [
            Line2D([], [], color=optimizer_color(o), marker="o", lw=1.6, label=o)
            for o in optimizers
        ]
        gray = "0.35"
        if "completed" in styles_used:
            handles.append(Line2D([], [], ls="", marker="o", color=gray, label="completed"))
        if "stopped_early" in styles_used:
            handles.append(
                Line2D(
                    [], [], ls="", marker="o", mfc="white", mec=gray, label="stopped early (ASHA)"
                )
            )
        if "running" in styles_used:
            handles.append(
                Line2D([], [], ls="", marker="D", mfc="white", mec=gray, label="running")
            )
        if "off_scale" in styles_used:
            handles.append(
                Line2D([], [], ls="", marker="^", color=gray, label="loss above the axis")
            )
        if diverged:
            handles.append(
                Line2D([], [], ls="", marker="x", color=gray, mew=2, label="diverged (off scale)")
            )
        if handles:
            ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.9)
        else:
            ax.text(0.5, 0.5, "no trials yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("best validation loss")
        ax.set_title(_title("Learning-rate sensitivity", name))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="x", alpha=0.12)
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

    groups = _trial_groups(steps)
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

    groups = _trial_groups(steps)
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


# --------------------------------------------------------------------------- render / CLI


def render(
    where: str | Path | Storage, out_dir: str | Path | None = None, plots: bool = True
) -> tuple[str, list[Path | str]]:
    """Summary text and the PNGs written (into out_dir, default the sweep or run folder)."""
    folder = folder_storage(where)
    trials, steps, metadata = load(folder)
    name = metadata.get("name")
    text = format_summary(summarize(trials, steps, name=name))
    written: list[Path | str] = []
    if not plots:
        return text, written
    out = folder if out_dir is None else storage.resolve(str(out_dir), check=False)

    def target(file_name: str) -> PlotTarget:
        return (out, f"{out.root}/{file_name}")

    # A single training run has one learning rate: no sensitivity curve to draw.
    single_run = not metadata["has_trials_file"] and trials is not None and len(trials) <= 1
    if trials is not None and len(trials) and not single_run:
        written.append(plot_lr_sensitivity(trials, target(PLOT_FILES[0]), name))
    if steps is not None and len(steps):
        written.append(plot_loss_curves(steps, target(PLOT_FILES[1]), name))
        written.append(plot_throughput(steps, target(PLOT_FILES[2]), name))
    return text, written


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.report",
        description="Summarize a raygpt sweep (or run) folder: best learning rate per optimizer, "
        "status counts, compute, and plots.",
    )
    parser.add_argument(
        "sweep_dir", help="sweep or run folder: <storage>/<name>, a local path or s3://, gs://"
    )
    parser.add_argument(
        "--out", default=None, help="folder for the PNGs (default: the sweep folder)"
    )
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    args = parser.parse_args(argv)
    if args.json:
        trials, steps, metadata = load(args.sweep_dir)
        summary = summarize(trials, steps, name=metadata.get("name"))
        print(json.dumps(summary, indent=2, default=str))
        return 0
    text, pngs = render(args.sweep_dir, args.out, plots=not args.no_plots)
    print(text)
    if pngs:
        print()
        for png in pngs:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
