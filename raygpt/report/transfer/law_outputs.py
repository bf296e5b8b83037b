"""The files of a learning-rate law: lr_law.json (the record) and lr_law.png (the plot).

`python -m raygpt.report --lr-law` writes them into the first sweep's folder (or
`--out`); `parse_point` reads its `--predict N=...,D=...`, and `outcome` gives the laws,
the record and the lines it prints (`python -m raygpt.service lr-law` prints the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raygpt import results
from raygpt.errors import UserError
from raygpt.report.transfer.law import D_REF, N_REF, Law, Prediction, fit_laws
from raygpt.report.transfer.law_rows import D_MEANS, N_MEANS
from raygpt.storage import Storage

LAW_FILE = "lr_law.json"
LAW_PLOT = "lr_law.png"


def parse_point(text: str) -> dict[str, float]:
    """--predict N=124M,D=2.5e9 as {"N": 1.24e8, "D": 2.5e9} (suffixes k, M, B, G, T)."""
    scales = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("N", "D"):
            raise UserError(f"--predict {text!r}: give N=... and/or D=..., e.g. N=124M,D=2.5e9")
        value = value.strip()
        scale = scales.get(value[-1:], 1.0)
        try:
            out[key] = float(value[:-1] if scale != 1.0 else value) * scale
        except ValueError:
            raise UserError(f"--predict {key}={value!r} is not a number (124M, 2.5e9)") from None
    if not out:
        raise UserError(f"--predict {text!r}: give N=... and/or D=..., e.g. N=124M,D=2.5e9")
    return out


def record(
    laws: Mapping[str, Law],
    skipped: Mapping[str, str],
    sweeps: Sequence[str],
    predictions: Mapping[str, Prediction] | None = None,
) -> dict[str, Any]:
    """What lr_law.json holds."""
    return {
        "sweeps": list(sweeps),
        "N": N_MEANS,
        "D": D_MEANS,
        "laws": {opt: law.to_dict() for opt, law in laws.items()},
        "not_fitted": dict(skipped),
        "predictions": {opt: p.to_dict() for opt, p in (predictions or {}).items()},
    }


def outcome(
    rows: Sequence[Mapping[str, Any]],
    sweeps: Sequence[str],
    point: Mapping[str, float] | None = None,
    extrapolate: bool = False,
) -> tuple[dict[str, Law], dict[str, Any], list[str]]:
    """The laws over law rows (law_rows), lr_law.json's record and the lines to print:
    a law (or why none) per optimizer, then the prediction at `point` (parse_point's).
    Whatever refuses (too few sizes, a point too far out) does so here, before anything
    is written."""
    laws, skipped = fit_laws(rows)
    predictions = {}
    if point is not None:
        for opt, law in laws.items():
            predictions[opt] = law.predict(point.get("N"), point.get("D"), extrapolate=extrapolate)
    lines = [law.line() for law in laws.values()]
    lines += [f"{opt}: no law: {why}" for opt, why in skipped.items()]
    lines += [p.line() for p in predictions.values()]
    return laws, record(laws, skipped, sweeps, predictions), lines


def plot_law(laws: Mapping[str, Law], target, name: str | None = None) -> Path | str:
    """Best lr against N (log-log), one colour per optimizer, with the fitted law: one line
    per fitted D (dashed after the first)."""
    from raygpt.report.plots import _pyplot, _save, optimizer_color

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    try:
        for opt, law in laws.items():
            color = optimizer_color(opt)
            ns = np.array([p.N for p in law.points], dtype=float)
            lrs = np.array([p.best.lr for p in law.points])
            low = np.array([p.best.low or p.best.lr for p in law.points])
            high = np.array([p.best.high or p.best.lr for p in law.points])
            ax.errorbar(
                ns, lrs, yerr=[lrs - low, high - lrs], fmt="o", color=color, capsize=3, label=opt
            )
            span = np.geomspace(law.n_range[0] / 1.5, law.n_range[1] * 1.5, 50)
            for k, d in enumerate(sorted({p.D for p in law.points})):
                fit = law.a * (span / N_REF) ** law.alpha * (d / D_REF) ** law.beta
                ax.plot(span, fit, "-" if k == 0 else "--", color=color, lw=1.2, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N, non-embedding parameters")
        ax.set_ylabel("best learning rate (90% interval)")
        ax.set_title(f"learning-rate law — {name}" if name else "learning-rate law")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, target)


def write_outputs(
    out: Storage,
    law_record: dict[str, Any],
    laws: Mapping[str, Law],
    plot: bool = True,
    name: str | None = None,
) -> list[Path | str]:
    """lr_law.json (and lr_law.png) into the folder `out`; the paths written."""
    json_path = f"{out.root}/{LAW_FILE}"
    results.write_json(out, json_path, law_record)
    written: list[Path | str] = [Path(json_path) if out.is_local else out.display(json_path)]
    if plot:
        written.append(plot_law(laws, (out, f"{out.root}/{LAW_PLOT}"), name))
    return written
