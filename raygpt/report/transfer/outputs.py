"""A transfer's files: transfer.parquet (one row per optimizer x size, its prediction and
its confirmation) and transfer.png (loss against learning rate, one line per size, one
panel per optimizer), written whole through the transfer folder's Storage.

What they hold is analysis.py's analysis; the `kind` column says which row is which:

- "proxy": one optimizer at one proxy size: its best lr (`lr`) with the interval
  (`low`, `high`; null on a side the grid left open), `edge`, `fit` and `interval`
  as lr_fit.BestLR has them, `in_trend` (false when the best lr is at the grid's edge,
  or there is none: `notes` says why), the lowest mean val loss, its trials, their
  device-seconds and FLOPs;
- "prediction": the optimizer's lr at the target with its interval, the trend's
  `slopes` (JSON: slope and interval per axis), `device_seconds` (the proxies' cost),
  `direct_device_seconds` and `direct_trials` (the estimated direct sweep);
- "confirm": with --confirm, the target's mean val loss at `multiple` x the prediction
  (0.5, 1, 2), and `best` on the lowest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raygpt import results
from raygpt.model.sizes import non_embedding_params, padded_vocab_size
from raygpt.report.transfer.analysis import Transfer, dumps, record
from raygpt.report.transfer.fit import usable_trials
from raygpt.report.transfer.plan import SIZE_KEYS, size_text
from raygpt.storage import Storage

TRANSFER_FILE = "transfer.parquet"
TRANSFER_PLOT = "transfer.png"

TRANSFER_SCHEMA = pa.schema(
    [
        ("optimizer", pa.string()),
        ("kind", pa.string()),  # proxy | prediction | confirm
        ("size", pa.string()),  # JSON: {"n_embd": 64, "n_head": 2, "n_layer": 1}
        ("name", pa.string()),  # the proxy's folder under proxies/ (null for the target)
        ("n_embd", pa.int64()),
        ("n_layer", pa.int64()),
        ("n_head", pa.int64()),
        ("n_params", pa.int64()),
        ("parametrization", pa.string()),
        ("lr", pa.float64()),
        ("low", pa.float64()),
        ("high", pa.float64()),
        ("level", pa.float64()),
        ("edge", pa.string()),
        ("fit", pa.string()),
        ("interval", pa.string()),
        ("in_trend", pa.bool_()),
        ("val_loss", pa.float64()),
        ("trials", pa.int64()),
        ("device_seconds", pa.float64()),
        ("flops", pa.float64()),
        ("slopes", pa.string()),
        ("direct_device_seconds", pa.float64()),
        ("direct_trials", pa.int64()),
        ("multiple", pa.float64()),
        ("best", pa.bool_()),
        ("notes", pa.string()),
        ("folder", pa.string()),
    ]
)


def _parametrization(transfer: Transfer) -> str:
    for proxy in transfer.proxies:
        for row in proxy.rows:
            if row.get("parametrization"):
                return str(row["parametrization"])
        config = proxy.metadata.get("config") or {}
        if config.get("parametrization"):
            return str(config["parametrization"])
    return "sp"


def _target_shape(transfer: Transfer) -> tuple[dict[str, int], int | None]:
    base = next((p.metadata for p in transfer.proxies if p.metadata), {})
    config = base.get("config") or {}
    shape = {k: int(config[k]) for k in SIZE_KEYS if config.get(k) is not None}
    shape |= transfer.target
    vocab = (base.get("data") or {}).get("vocab_size")
    n = None
    if vocab is not None and {"n_layer", "n_embd"} <= set(shape):
        n = non_embedding_params(
            shape["n_layer"],
            shape["n_embd"],
            padded_vocab_size(int(vocab)),
            bool(config.get("bias")),
        )
    return shape, n


def transfer_rows(transfer: Transfer) -> list[dict[str, Any]]:
    """The rows of transfer.parquet (TRANSFER_SCHEMA)."""
    kind_of = _parametrization(transfer)
    shape, target_n = _target_shape(transfer)
    rows = []
    for opt, t in transfer.optimizers.items():
        for f in t.fits:
            b = f.best
            rows.append(
                {
                    "optimizer": opt,
                    "kind": "proxy",
                    "size": dumps(f.proxy.size),
                    "name": f.proxy.name,
                    **{k: f.proxy.size.get(k) for k in SIZE_KEYS},
                    "n_params": f.proxy.n_params,
                    "parametrization": kind_of,
                    "lr": b.lr if b else None,
                    "low": b.low if b else None,
                    "high": b.high if b else None,
                    "level": b.level if b else None,
                    "edge": b.edge if b else None,
                    "fit": b.fit if b else None,
                    "interval": b.interval if b else None,
                    "in_trend": f.in_trend,
                    "val_loss": min(b.mean_loss) if b else None,
                    "trials": f.trials,
                    "device_seconds": f.device_seconds,
                    "flops": f.flops,
                    "notes": "; ".join(b.notes) if b else f.reason,
                    "folder": f.proxy.where,
                }
            )
        tr = t.trend
        rows.append(
            {
                "optimizer": opt,
                "kind": "prediction",
                "size": dumps(transfer.target),
                **{k: shape.get(k) for k in SIZE_KEYS},
                "n_params": target_n,
                "parametrization": kind_of,
                "lr": tr.lr if tr else None,
                "low": tr.low if tr else None,
                "high": tr.high if tr else None,
                "level": tr.level if tr else None,
                "trials": len(tr.sizes) if tr else 0,
                "device_seconds": t.device_seconds,
                "slopes": dumps({a: [tr.slopes[a], *tr.slope_intervals[a]] for a in tr.axes})
                if tr
                else None,
                "direct_device_seconds": t.direct_device_seconds,
                "direct_trials": t.direct_trials,
                "notes": "; ".join(tr.notes) if tr else t.reason,
            }
        )
        best = t.confirmed
        lowest = min(
            (c for c in t.confirm if c["val_loss"] is not None),
            key=lambda c: c["val_loss"],
            default=None,
        )
        for c in t.confirm:
            rows.append(
                {
                    "optimizer": opt,
                    "kind": "confirm",
                    "size": dumps(transfer.target),
                    **{k: shape.get(k) for k in SIZE_KEYS},
                    "n_params": target_n,
                    "parametrization": kind_of,
                    "lr": c["lr"],
                    "val_loss": c["val_loss"],
                    "trials": c["n"],
                    "multiple": c["multiple"],
                    "best": None if best is None else c is lowest,
                }
            )
    return [{name: row.get(name) for name in TRANSFER_SCHEMA.names} for row in rows]


def write_outputs(
    transfer_store: Storage, transfer: Transfer, plot: bool = True, name: str | None = None
) -> list[Path | str]:
    """transfer.parquet (and transfer.png) into the transfer folder; the paths written."""
    table = pa.Table.from_pylist(transfer_rows(transfer), schema=TRANSFER_SCHEMA)
    path = f"{transfer_store.root}/{TRANSFER_FILE}"
    results.write_table(
        transfer_store, path, results.with_metadata(table, {"transfer": record(transfer)})
    )
    written: list[Path | str] = [
        Path(path) if transfer_store.is_local else transfer_store.display(path)
    ]
    if plot:
        written.append(
            plot_transfer(
                transfer, (transfer_store, f"{transfer_store.root}/{TRANSFER_PLOT}"), name
            )
        )
    return written


def _curve(rows: list[dict[str, Any]], opt: str) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Mean final val loss per learning rate (finite ones), and the lrs that diverged."""
    lrs, losses = usable_trials([r for r in rows if r.get("optimizer") == opt]).get(opt, ([], []))
    by_lr: dict[float, list[float]] = {}
    for lr, loss in zip(lrs, losses, strict=True):
        by_lr.setdefault(round(math.log(lr), 9), []).append(loss)
    xs, ys, diverged = [], [], []
    for key in sorted(by_lr):
        values = by_lr[key]
        if all(map(math.isfinite, values)):
            xs.append(math.exp(key))
            ys.append(float(np.mean(values)))
        else:
            diverged.append(math.exp(key))
    return np.array(xs), np.array(ys), diverged


def plot_transfer(transfer: Transfer, target, name: str | None = None) -> Path | str:
    """Final val loss against learning rate (log x), one line per proxy size (darker is
    larger), one panel per optimizer; each size's best lr a dotted line, the target's
    prediction a dashed black line in its grey 90% band, and with --confirm the target's
    own three points."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    from raygpt.report.plots import _pyplot, _robust_top, _save

    plt = _pyplot()
    opts = list(transfer.optimizers.values())
    panels = max(1, len(opts))
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + 1.0, 4.8), squeeze=False)
    cmap = colormaps["viridis"]
    count = len(transfer.proxies)
    colors = {
        p.name: cmap(0.85 - 0.7 * i / max(count - 1, 1)) for i, p in enumerate(transfer.proxies)
    }
    target_text = size_text(transfer.target)
    try:
        for ax, t in zip(axes[0], opts or [None], strict=False):
            ax.set_xscale("log")
            if t is None:
                ax.text(0.5, 0.5, "no trials yet", ha="center", va="center", transform=ax.transAxes)
                continue
            values = []
            for f in t.fits:
                color = colors[f.proxy.name]
                xs, ys, diverged = _curve(f.proxy.rows, t.optimizer)
                label = size_text(f.proxy.size, transfer.keys)
                if f.best is not None and f.best.edge:
                    label += " (best at the grid's edge: not in the trend)"
                if len(xs):
                    ax.plot(xs, ys, "-o", color=color, ms=4, lw=1.4, label=label)
                    values.append(ys)
                for lr in diverged:
                    ax.plot(
                        lr, 0.97, "x", color=color, ms=8, mew=2, transform=ax.get_xaxis_transform()
                    )
                if f.best is not None:
                    ax.axvline(f.best.lr, color=color, ls=":", lw=1.2, alpha=0.9)
            if t.confirm:
                pts = [c for c in t.confirm if c["val_loss"] is not None]
                if pts:
                    ys = np.array([c["val_loss"] for c in pts])
                    ax.plot(
                        [c["lr"] for c in pts],
                        ys,
                        "-s",
                        color="black",
                        ms=6,
                        label=f"target {target_text}",
                    )
                    values.append(ys)
            if t.trend is not None:
                ax.axvspan(t.trend.low, t.trend.high, color="0.5", alpha=0.18, lw=0)
                ax.axvline(
                    t.trend.lr, color="black", ls="--", lw=1.5, label="prediction (90% band)"
                )
            if values:
                everything = np.concatenate(values)
                lo, hi = float(everything.min()), _robust_top(everything)
                span = max(hi - lo, 0.02 * max(abs(hi), 1.0))
                ax.set_ylim(lo - 0.1 * span, hi + 0.15 * span)
            ax.set_title(t.optimizer)
            ax.set_xlabel("learning rate (log scale)")
            ax.grid(True, which="major", alpha=0.35)
            handles, _ = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], color="0.3", ls=":", label="best lr per size"))
            ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.9)
        axes[0][0].set_ylabel("final val loss (mean over seeds)")
        title = f"Learning-rate transfer to {target_text}"
        fig.suptitle(f"{title} — {name}" if name else title)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, target)
