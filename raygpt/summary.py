"""What a sweep (or run) folder says: its tables, read back, and the summary of them.

Reads only the Parquet files a sweep (or a single `raygpt.train` run) leaves in
`<storage>/<name>/`, a local folder or an s3:// or gs:// URI: `trials.parquet`
(one row per trial) and the step parts (one row per trial and step; see
results.py). No Ray import, so it runs anywhere the files are, also while a
sweep is still writing them: every file is written whole, and a missing one
just means "nothing yet".

The summary compares trials at equal budget (comparisons.py): the answer is the
best configuration among those that trained the full budget, never a trial
stopped early beside completed ones, and with seeds it is a mean +- sd with a
test of whether the winner's lead exceeds the noise.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raygpt import comparisons, metrics, results, status, storage
from raygpt.errors import UserError
from raygpt.storage import Storage

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


def columns(table: pa.Table, names: tuple[str, ...]) -> dict[str, np.ndarray]:
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


def trial_groups(steps: pa.Table | None) -> list[dict[str, Any]]:
    """Steps split per trial, each sorted by step: [{trial_id, optimizer, learning_rate, cols}]."""
    if steps is None or len(steps) == 0:
        return []
    names = tuple(results.STEP_COLUMNS)
    cols = columns(steps, names)
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
    for group in trial_groups(steps):
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


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def trial_rows(trials: pa.Table | None) -> list[dict[str, Any]]:
    if trials is None:
        return []
    rows = trials.to_pylist()
    for row in rows:
        row["status"] = row.get("status") or status.RUNNING
        row["optimizer"] = row.get("optimizer") or "?"
    return rows


def _can_win(row: dict[str, Any]) -> bool:
    return row["status"] in status.CAN_WIN and finite(row.get("best_val_loss"))


def evals_by_trial(steps: pa.Table | None) -> dict[str, dict[int, float]]:
    """Each trial's val loss at its evaluated steps, the cooled copy's where a rung had one
    (rung_cooldown.py): the value its scheduler ranked it on."""
    out: dict[str, dict[int, float]] = {}
    for group in trial_groups(steps):
        c = group["cols"]
        cooled = c.get("cooled_val_loss")
        vals = {}
        for i in np.flatnonzero(c["val_valid"]):
            value = c["val_loss"][i]
            if cooled is not None and np.isfinite(cooled[i]):
                value = cooled[i]
            vals[int(c["step"][i])] = float(value)
        if vals:
            out[group["trial_id"]] = vals
    return out


def summarize(
    trials: pa.Table | None, steps: pa.Table | None, name: str | None = None
) -> dict[str, Any]:
    """Best configuration per optimizer and overall, compared at equal budget
    (comparisons.py), with seed statistics; status counts and compute spent."""
    if trials is None and steps is not None:
        trials = derive_trials(steps)
    rows = trial_rows(trials)
    evals = evals_by_trial(steps)

    per_opt: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = per_opt.setdefault(
            row["optimizer"],
            {
                "optimizer": row["optimizer"],
                "trials": 0,
                "status_counts": Counter(),
                "budget": None,
                "best_learning_rate": None,
                "best_val_loss": None,
                "best_sd": None,
                "best_n": None,
                "best_trial_id": None,
                "best_momentum": None,
            },
        )
        entry["trials"] += 1
        entry["status_counts"][row["status"]] += 1
    for entry in per_opt.values():
        own = [r for r in rows if r["optimizer"] == entry["optimizer"]]
        found = comparisons.compare(own, evals)
        answer = found.get("answer")
        if answer:
            entry |= {
                "budget": found["top_budget"],
                "best_learning_rate": answer["learning_rate"],
                "best_val_loss": answer["mean"],
                "best_sd": answer["sd"],
                "best_n": answer["n"],
                "best_trial_id": answer["trial_ids"][0],
                "best_momentum": answer["params"].get("momentum")
                if entry["optimizer"] == "momentum"
                else None,
            }
    # Optimizers that reached the largest budget first: a lower budget is not comparable.
    optimizers = sorted(
        per_opt.values(),
        key=lambda e: (
            e["best_val_loss"] is None,
            -(e["budget"] or 0),
            e["best_val_loss"] or 0.0,
            e["optimizer"],
        ),
    )
    for entry in optimizers:
        entry["status_counts"] = dict(entry["status_counts"])
        entry["best_at_edge"] = _edge(entry, rows)
    compared = comparisons.compare(rows, evals)
    best = None
    if compared.get("answer"):
        a = compared["answer"]
        best = {
            "optimizer": a["optimizer"],
            "learning_rate": a["learning_rate"],
            "val_loss": a["mean"],
            "sd": a["sd"],
            "n": a["n"],
            "step": compared["top_budget"],
            "config": a["config"],
            "trial_id": a["trial_ids"][0],
            "momentum": a["params"].get("momentum") if a["optimizer"] == "momentum" else None,
        }
    scored = [r for r in rows if comparisons.comparable(r) and finite(r.get("hellaswag_acc_norm"))]
    best_acc = max(scored, key=lambda r: r["hellaswag_acc_norm"], default=None)
    return {
        "name": name,
        "trials": len(rows),
        "status_counts": dict(Counter(r["status"] for r in rows)),
        "optimizers": optimizers,
        "best": best,
        "best_hellaswag": None
        if best_acc is None
        else {
            "optimizer": best_acc["optimizer"],
            "learning_rate": best_acc["learning_rate"],
            "acc_norm": best_acc["hellaswag_acc_norm"],
            "trial_id": best_acc["trial_id"],
            "steps": best_acc.get("steps"),
        },
        "comparison": compared,
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
        and finite(r.get("learning_rate"))
    }
    if not finite(best) or len(tried) < 3:
        return None
    if best >= max(tried):
        return "highest"
    if best <= min(tried):
        return "lowest"
    return None


def _compute(rows: list[dict[str, Any]], steps: pa.Table | None) -> dict[str, Any]:
    def total(key: str) -> float | None:
        values = [r[key] for r in rows if finite(r.get(key))]
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
        cols = columns(steps, ("trial_id", "tokens_seen", "step_time_ms", "tokens_per_sec", "mfu"))
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
    return f"{lr:.3g}" if finite(lr) else "-"


def _format_loss(loss: Any) -> str:
    return f"{loss:.4f}" if finite(loss) else "-"


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


def _format_spread(mean: Any, sd: Any, n: Any) -> str:
    """A val loss, as mean +- sd (n seeds) where there are seeds."""
    if not finite(mean):
        return "-"
    if n and n > 1 and finite(sd):
        return f"{mean:.4f} ± {sd:.4f} (n={n})"
    return f"{mean:.4f}"


def _comparison_lines(compared: dict[str, Any]) -> list[str]:
    """Each budget's best (equal budget: a trial counts only at steps it reached), the
    seeds' ranking at the largest budget, and whether the winner's lead is beyond noise."""
    lines = []
    budgets = compared.get("budgets") or []
    if len(budgets) > 1:
        lines.append("budgets:  best at each step the trials were compared at (ASHA's rungs):")
        for b in budgets:
            best = b["best"]
            lines.append(
                f"          step {b['step']:>6}: {best['config']}, val "
                f"{_format_spread(best['mean'], best['sd'], best['n'])} "
                f"({b['configs']} configuration(s) reached it)"
            )
    seeded = [c for c in compared.get("ranking") or [] if c["n"] > 1]
    if seeded:
        lines.append(f"seeds:    mean ± sd over seeds at step {compared['top_budget']}:")
        for c in seeded:
            target = [t for t in c.get("steps_to_target") or [] if t is not None]
            reach = ""
            if c.get("steps_to_target") and any(t is not None for t in c["steps_to_target"]):
                reach = (
                    f", target reached by {len(target)}/{c['n']} (mean step {np.mean(target):.0f})"
                )
            lines.append(
                f"          {c['config']}: {_format_spread(c['mean'], c['sd'], c['n'])}{reach}"
            )
    verdict = comparisons.describe_test(compared.get("test"))
    if verdict:
        lines.append(f"noise:    {verdict}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """A fixed-width table for stdout: optimizers by best loss, status counts, compute."""
    lines = []
    title = f"sweep {summary['name']}" if summary.get("name") else "sweep"
    lines.append(f"{title}: {summary['trials']} trial(s)")
    if not summary["trials"]:
        lines.append("no trials yet")
    statuses = _status_list(summary["status_counts"])
    show_momentum = any(e["best_momentum"] is not None for e in summary["optimizers"])

    header = ["optimizer", "best lr", "val loss", "at step", "trials", *statuses]
    if show_momentum:
        header.insert(2, "momentum")
    table = [header]
    for e in summary["optimizers"]:
        row = [
            e["optimizer"],
            format_lr(e["best_learning_rate"]),
            _format_spread(e["best_val_loss"], e.get("best_sd"), e.get("best_n")),
            str(e["budget"]) if e.get("budget") is not None else "-",
            str(e["trials"]),
            *(str(e["status_counts"].get(s, 0)) for s in statuses),
        ]
        if show_momentum:
            m = e["best_momentum"]
            row.insert(2, f"{m:.3g}" if finite(m) else "-")
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
        extra = f", momentum {best['momentum']:.3g}" if finite(best.get("momentum")) else ""
        trial = f", trial {best['trial_id']}" if best.get("trial_id") and best.get("n") == 1 else ""
        lines.append(
            f"best:     {best['optimizer']} at lr {format_lr(best['learning_rate'])}{extra} "
            f"(val loss {_format_spread(best['val_loss'], best.get('sd'), best.get('n'))} "
            f"at step {best['step']}{trial})"
        )
    else:
        lines.append("best:     none yet (no finished trial with a finite val loss)")
    lines += _comparison_lines(summary.get("comparison") or {})
    acc = summary.get("best_hellaswag")
    if acc:
        lines.append(
            f"hellaswag: best acc_norm {acc['acc_norm']:.4f}: {acc['optimizer']} at lr "
            f"{format_lr(acc['learning_rate'])} (trial {acc['trial_id']}, step {acc['steps']})"
        )
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
