"""A learning-rate transfer read back: what its proxies' sweeps say about the target.

`python -m raygpt.sweep EXP.toml --transfer n_embd=64,128,256 --target n_embd=768`
(raygpt/sweep/transfer.py) runs one sweep per proxy size into
`<transfer>/proxies/<size>/`; this module reads them back and starts no Ray:

- the plan (plan.py): the proxy sizes, and the target;
- per optimizer and size, the best learning rate with its interval (`lr_fit.best_lr`,
  each size with its own bootstrap seed), then the trend across sizes and the
  target's prediction with its interval (`lr_trend.fit_trend`);
- the cost: the proxies' measured device-seconds, and an estimate of a direct sweep
  at the target with as many trials and as many steps: the device-seconds per
  training FLOP measured at the largest proxy (the one nearest the target's
  efficiency) times the target's FLOPs (compute.py counts them);
- with `--confirm`, the target trained at the prediction and at 2x and 1/2 of it
  (`<transfer>/confirm-target/`), and whether the prediction was the best of the three.

outputs.py writes transfer.parquet and transfer.png from what `analyse` finds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raygpt import results
from raygpt.errors import UserError
from raygpt.model.sizes import non_embedding_params, padded_vocab_size
from raygpt.report.compute import flops_per_token, fmt_hours
from raygpt.report.transfer.fit import LEVEL, BestLR, best_lr, sci, usable_trials
from raygpt.report.transfer.law_rows import budget
from raygpt.report.transfer.plan import CONFIRM_MULTIPLES, PROXIES_DIR, SIZE_KEYS, size_text
from raygpt.report.transfer.trend import Trend, fit_trend
from raygpt.storage import Storage

# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class Proxy:
    """One proxy sweep's folder, read back."""

    name: str  # the folder under proxies/: n_embd=64
    size: dict[str, int]
    rows: list[dict[str, Any]]  # trials.parquet's, TRIAL_SCHEMA
    metadata: dict[str, Any]  # its footer: sweep, config, data
    where: str

    @property
    def n_params(self) -> int | None:
        reported = [r["n_params"] for r in self.rows if r.get("n_params") is not None]
        if reported:
            return int(max(reported))
        return _formula_params(self.metadata, self.size)


def read_sweep(store: Storage, fs_path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A sweep folder's trials.parquet rows and footer; ([], {}) when it has none yet."""
    try:
        table = results.read_table(store, f"{fs_path}/{results.TRIALS_FILE}")
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(
            f"cannot read {store.display(fs_path)}: {str(err).splitlines()[0]}"
        ) from None
    if table is None:
        return [], {}
    metadata = results.decode_metadata(table.schema)
    return results.conform(table, results.TRIAL_SCHEMA).to_pylist(), metadata


def read_proxies(transfer: Storage, sizes: Sequence[tuple[str, Mapping[str, int]]]) -> list[Proxy]:
    """Every proxy of the plan, from `<transfer>/proxies/<name>/`."""
    out = []
    for name, size in sizes:
        path = transfer.path(PROXIES_DIR, name)
        rows, metadata = read_sweep(transfer, path)
        out.append(Proxy(name, dict(size), rows, metadata, transfer.display(path)))
    return out


def _formula_params(metadata: Mapping[str, Any], size: Mapping[str, int]) -> int | None:
    config = metadata.get("config") or {}
    vocab = (metadata.get("data") or {}).get("vocab_size") or config.get("vocab_size")
    if vocab is None:
        return None
    return non_embedding_params(
        int(size["n_layer"]),
        int(size["n_embd"]),
        padded_vocab_size(int(vocab)),
        bool(config.get("bias")),
    )


def target_flops_per_trial(metadata: Mapping[str, Any], target: Mapping[str, int]) -> float | None:
    """The training FLOPs of one trial at the target: its per-token FLOPs times the tokens
    a proxy trial was set to train (the same steps and batch)."""
    config = metadata.get("config") or {}
    size = {k: int(config[k]) for k in SIZE_KEYS if config.get(k) is not None} | dict(target)
    n = _formula_params(metadata, size)
    tokens = budget(config)
    if n is None or tokens is None or len(size) < len(SIZE_KEYS) or not config.get("block_size"):
        return None
    per_token = flops_per_token(
        n, size["n_layer"], size["n_head"], size["n_embd"], int(config["block_size"])
    )
    return float(per_token) * tokens


# --------------------------------------------------------------------------- the analysis


@dataclass
class SizeFit:
    """One optimizer at one proxy size."""

    proxy: Proxy
    best: BestLR | None
    reason: str | None  # why there is no best lr
    trials: int
    points: int  # distinct configurations (learning rates, searched keys)
    device_seconds: float | None
    flops: float | None

    @property
    def in_trend(self) -> bool:
        return self.best is not None and self.best.edge is None


@dataclass
class OptimizerTransfer:
    """One optimizer's transfer: a best lr per size, the trend, the prediction, the cost."""

    optimizer: str
    fits: list[SizeFit]
    trend: Trend | None
    reason: str | None  # why there is no prediction
    direct_device_seconds: float | None = None
    direct_trials: int | None = None
    direct_points: int | None = None
    confirm: list[dict[str, Any]] = field(default_factory=list)  # multiple, lr, val_loss, n

    @property
    def device_seconds(self) -> float | None:
        known = [f.device_seconds for f in self.fits if f.device_seconds is not None]
        return float(sum(known)) if known else None

    @property
    def confirmed(self) -> bool | None:
        """Whether the prediction had the lowest val loss of the three (None: not run)."""
        scored = [c for c in self.confirm if c["val_loss"] is not None]
        if not scored:
            return None
        return min(scored, key=lambda c: c["val_loss"])["multiple"] == 1.0


@dataclass
class Transfer:
    target: dict[str, int]
    keys: tuple[str, ...]  # the axes' keys, and the target's: what names a size in lines
    optimizers: dict[str, OptimizerTransfer]
    proxies: list[Proxy]
    on_gpu: bool

    def predictions(self) -> dict[str, float]:
        return {o: t.trend.lr for o, t in self.optimizers.items() if t.trend is not None}


def _seed(size_index: int, opt_index: int) -> int:
    """Each (size, optimizer) its own bootstrap stream: sizes that shared one would share
    their draws, and the trend would take them as independent."""
    return int(np.random.SeedSequence([size_index, opt_index]).generate_state(1)[0])


def _sum(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(sum(values)) if values else None


def analyse(
    proxies: Sequence[Proxy],
    target: Mapping[str, int],
    keys: Sequence[str],
    optimizers: Sequence[str] | None = None,
    level: float = LEVEL,
) -> Transfer:
    """The transfer the proxies' sweeps give, per optimizer (see the module docstring)."""
    found = sorted({str(r["optimizer"]) for p in proxies for r in p.rows if r.get("optimizer")})
    names = list(optimizers) if optimizers else found
    keys = tuple(dict.fromkeys([*keys, *target]))
    out: dict[str, OptimizerTransfer] = {}
    base = next((p.metadata for p in proxies if p.metadata), {})
    per_trial = target_flops_per_trial(base, target)
    for j, opt in enumerate(names):
        fits = []
        for i, proxy in enumerate(proxies):
            mine = [r for r in proxy.rows if r.get("optimizer") == opt]
            label = f"{opt} at {size_text(proxy.size, keys)}"
            best, reason = None, None
            curve = usable_trials(mine).get(opt)
            if not mine:
                reason = "no trials (the proxy's sweep has not run)"
            elif not curve:
                reason = "no trial trained to the end"
            else:
                try:
                    best = best_lr(*curve, level=level, seed=_seed(i, j), label=label)
                except UserError as err:
                    reason = str(err).removeprefix(f"{label}: ")
            fits.append(
                SizeFit(
                    proxy,
                    best,
                    reason,
                    trials=len(mine),
                    points=len({r.get("config_key") for r in mine}),
                    device_seconds=_sum(mine, "device_seconds"),
                    flops=_sum(mine, "flops"),
                )
            )
        have = [f for f in fits if f.best is not None]
        trend, why = None, None
        if not have:
            why = "; ".join(f"{f.proxy.name}: {f.reason}" for f in fits[:2]) or "no proxies"
        else:
            try:
                trend = fit_trend(
                    [{k: f.proxy.size[k] for k in target} for f in have],
                    [f.best for f in have],
                    target,
                    level=level,
                    label=opt,
                )
            except UserError as err:
                why = str(err).removeprefix(f"{opt}: ")
        result = OptimizerTransfer(opt, fits, trend, why)
        _direct_cost(result, per_trial)
        out[opt] = result
    on_gpu = any((r.get("gpu_hours") or 0) > 0 for p in proxies for r in p.rows)
    return Transfer(dict(target), keys, out, list(proxies), on_gpu)


def _direct_cost(result: OptimizerTransfer, per_trial: float | None) -> None:
    """A direct sweep at the target, with the largest proxy's trials and steps, at the
    largest proxy's measured device-seconds per FLOP."""
    measured = [f for f in result.fits if f.device_seconds and f.flops]
    if not measured or per_trial is None:
        return
    largest = max(measured, key=lambda f: f.proxy.n_params or 0)
    rate = largest.device_seconds / largest.flops
    result.direct_trials = largest.trials
    result.direct_points = largest.points
    result.direct_device_seconds = rate * per_trial * largest.trials


def confirm_points(
    rows: Sequence[Mapping[str, Any]], predicted: float, optimizer: str
) -> list[dict[str, Any]]:
    """The confirmation's learning rates (prediction x 1/2, 1, 2), each with its mean final
    val loss over seeds (None where one diverged or none finished)."""
    curve = usable_trials([r for r in rows if r.get("optimizer") == optimizer]).get(optimizer)
    out = []
    for multiple in CONFIRM_MULTIPLES:
        lr = predicted * multiple
        losses = []
        if curve:
            losses = [
                loss
                for at, loss in zip(*curve, strict=True)
                if math.isclose(math.log(at / lr), 0.0, abs_tol=1e-6)
            ]
        val = float(np.mean(losses)) if losses and all(map(math.isfinite, losses)) else None
        out.append({"multiple": multiple, "lr": lr, "val_loss": val, "n": len(losses)})
    return out


# --------------------------------------------------------------------------- lines


def _point_text(c: Mapping[str, Any]) -> str:
    what = {0.5: "÷2", 1.0: "the prediction", 2.0: "x2"}[c["multiple"]]
    if c["val_loss"] is not None:
        val = f"{c['val_loss']:.4f}"
    else:
        val = "diverged" if c["n"] else "not trained"
    return f"{val} at {what} ({sci(c['lr'])})"


def summary_line(
    t: OptimizerTransfer,
    target_text: str,
    gpu_hour_price: float | None = None,
    on_gpu: bool = False,
) -> str:
    """adamw: lr 3.1e-3 (90% interval 2.4e-3 to 4.0e-3) for n_embd=768, n_layer=12, from 3
    proxies; cost 0.41 device-hours vs ~9.8 for a direct 8-point sweep at the target."""
    if t.trend is None:
        return f"{t.optimizer}: no prediction for {target_text}: {t.reason}"
    tr = t.trend
    line = (
        f"{t.optimizer}: lr {sci(tr.lr)} ({tr.level:.0%} interval {sci(tr.low)} to "
        f"{sci(tr.high)}) for {target_text}, from {len(tr.sizes)} proxies"
    )
    hours = None if t.device_seconds is None else t.device_seconds / 3600
    line += f"; cost {fmt_hours(hours)} device-hours"
    if t.direct_device_seconds is not None:
        seeds = t.direct_trials // max(t.direct_points or 1, 1)
        over = f" over {seeds} seeds" if seeds > 1 else ""
        direct = t.direct_device_seconds / 3600
        line += (
            f" vs ~{fmt_hours(direct)} for a direct {t.direct_points}-point sweep{over} "
            "at the target"
        )
        if gpu_hour_price is not None and on_gpu and hours is not None:
            line += (
                f" ({hours * gpu_hour_price:,.2f} vs ~{direct * gpu_hour_price:,.2f} at "
                f"{gpu_hour_price:g} per GPU-hour)"
            )
    return line


def lines(transfer: Transfer, gpu_hour_price: float | None = None) -> list[str]:
    """One summary line per optimizer, each followed by its sizes, trend and notes
    (indented), and the confirmation's verdict where it ran."""
    target_text = size_text(transfer.target)
    out = []
    for t in transfer.optimizers.values():
        out.append(summary_line(t, target_text, gpu_hour_price, transfer.on_gpu))
        for f in t.fits:
            what = f.best.describe() if f.best is not None else f.reason
            out.append(f"  {size_text(f.proxy.size, transfer.keys)}: {what}")
        if t.trend is not None:
            slopes = ", ".join(
                f"{a} {t.trend.slopes[a]:+.2f} ({t.trend.slope_intervals[a][0]:+.2f}.."
                f"{t.trend.slope_intervals[a][1]:+.2f})"
                for a in t.trend.axes
            )
            out.append(f"  trend: ln lr slope against ln {slopes}")
            out += [f"  note: {n}" for n in t.trend.notes]
        if t.confirm:
            verdict = {
                True: "the prediction was the best of the three",
                False: "the prediction was not the best of the three",
                None: "no finite loss to compare",
            }[t.confirmed]
            shown = ", ".join(_point_text(c) for c in t.confirm)
            out.append(f"{t.optimizer}: confirmed at {target_text}: val {shown}: {verdict}")
    return out


def record(transfer: Transfer) -> dict[str, Any]:
    """The footer of transfer.parquet: the plan and each optimizer's trend."""
    return {
        "target": transfer.target,
        "keys": list(transfer.keys),
        "proxies": {p.name: p.size for p in transfer.proxies},
        "trends": {
            o: (t.trend.to_dict() if t.trend is not None else {"reason": t.reason})
            for o, t in transfer.optimizers.items()
        },
    }


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
