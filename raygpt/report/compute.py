"""Compute accounting: a model's size and FLOPs, a trial's device time, a sweep's totals.

Counted the way the training loop counts them, without building a model (or importing
torch), so that a sweep's record can be read and a target model's cost estimated
anywhere:

- N, the non-embedding parameter count, is what `GPT.n_params()` counts
  (raygpt/model/gpt.py): every weight but the position embeddings. The token embedding
  stays in because it is also the output layer (tied), whose FLOPs are real, as in the
  MFU formula.
- Training FLOPs per token are `GPT.flops_per_token()`'s: 6N + 12 L H Q T (PaLM's
  appendix B, nanoGPT's estimate_mfu): 6 per parameter (forward and backward) plus the
  attention's scores and weighted sum against T positions. A trial's FLOPs are that
  times the tokens it trained. Evaluations and rung cooldowns' copies are not counted.
- A trial's device-seconds are its training time (the sum of its step times, and the
  time its rung cooldowns trained) times the devices it held: workers x GPUs per worker
  on GPUs (a 0.25 GPU share counts a quarter), the workers themselves on CPUs, where a
  "device" is one worker process with its `cpus_per_worker` cores (1 in a sweep unless
  set). Start-up, evaluation and teardown are in wall_seconds and overhead_seconds,
  not here. GPU-hours are device-hours on GPUs, and 0 on CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def flops_per_token(n_params: int, n_layer: int, n_head: int, n_embd: int, seq_len: int) -> int:
    """GPT.flops_per_token(): 6 N + 12 L H Q T, with N = n_params (non-embedding),
    Q = n_embd // n_head (head size) and T = seq_len (the block size)."""
    return 6 * n_params + 12 * n_layer * n_head * (n_embd // n_head) * seq_len


def trial_compute(
    train_seconds: float | None,
    tokens: int | None,
    per_token: float | None,
    workers: int,
    gpus_per_worker: float,
) -> dict[str, float | None]:
    """A trial's `flops`, `device_seconds` and `gpu_hours` (None where unknown)."""
    on_gpu = gpus_per_worker > 0
    devices = workers * gpus_per_worker if on_gpu else float(workers)
    device_seconds = None if train_seconds is None else float(train_seconds) * devices
    return {
        "flops": None if per_token is None or tokens is None else float(per_token) * tokens,
        "device_seconds": device_seconds,
        "gpu_hours": None if device_seconds is None else (device_seconds / 3600 if on_gpu else 0.0),
    }


def totals(
    rows: Iterable[Mapping[str, Any]], gpu_hour_price: float | None = None
) -> dict[str, float | None]:
    """A sweep's FLOPs, device-hours and GPU-hours over its trials, and their cost at
    `gpu_hour_price` (per GPU-hour) when given. None where no trial recorded the value
    (a table written before these columns)."""

    def total(key: str) -> float | None:
        values = [float(r[key]) for r in rows if _finite(r.get(key))]
        return float(sum(values)) if values else None

    rows = list(rows)
    device_seconds = total("device_seconds")
    gpu_hours = total("gpu_hours")
    return {
        "total_flops": total("flops"),
        "device_hours": None if device_seconds is None else device_seconds / 3600,
        "gpu_hours": gpu_hours,
        "gpu_hour_price": gpu_hour_price,
        "cost": None if gpu_hour_price is None or gpu_hours is None else gpu_hours * gpu_hour_price,
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


# --------------------------------------------------------------------------- formatting


def fmt_count(n: float) -> str:
    """210k, 3.1M, 124M, 1.3B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.2g}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def fmt_flops(x: float | None) -> str:
    """3.1e15, "n/a" for None."""
    if not _finite(x):
        return "n/a"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_hours(x: float | None) -> str:
    """Device-hours to two significant digits: 0.41, 9.8, 0.0031, 120; "n/a" for None."""
    if not _finite(x):
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2g}"


def compute_line(c: Mapping[str, Any]) -> str:
    """The summary's line of FLOPs, device-hours and cost."""
    hours = c.get("device_hours")
    gpu = c.get("gpu_hours")
    if hours is None:
        kind = ""
    elif gpu:
        kind = f" ({fmt_hours(gpu)} GPU-hours)"
    else:
        kind = " (CPU workers, no GPU)"
    line = f"{fmt_flops(c.get('total_flops'))} FLOPs, {fmt_hours(hours)} device-hours{kind}"
    price = c.get("gpu_hour_price")
    if price is not None:
        cost = c.get("cost")
        line += (
            f", cost {cost:,.2f} at {price:g} per GPU-hour"
            if cost is not None
            else ", cost n/a (no GPU-hours recorded)"
        )
    return line
