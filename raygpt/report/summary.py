"""The summary of a sweep (or run) folder: which optimizer, at which learning rate.

The summary compares trials at equal budget (comparisons.py): the answer is the
best configuration among those that trained the full budget, never a trial
stopped early beside completed ones, and with seeds it is a mean +- sd with a
test of whether the winner's lead exceeds the noise. The folder's tables are
read by tables.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from raygpt import status
from raygpt.report import comparisons, compute
from raygpt.report.tables import columns, derive_trials, evals_by_trial, finite, trial_rows
from raygpt.train import metrics


def summarize(
    trials: pa.Table | None,
    steps: pa.Table | None,
    name: str | None = None,
    gpu_hour_price: float | None = None,
) -> dict[str, Any]:
    """Best configuration per optimizer and overall, compared at equal budget
    (comparisons.py), with seed statistics; status counts and compute spent: FLOPs,
    device-hours, GPU-hours and, with `gpu_hour_price`, their cost (compute.py)."""
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
        "compute": _compute(rows, steps) | compute.totals(rows, gpu_hour_price),
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
    lines.append(f"          {compute.compute_line(c)}")
    return "\n".join(lines)
