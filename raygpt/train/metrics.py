"""Throughput, MFU and the progress line; where step rows are written: results.py.

MFU (model FLOPs utilisation) follows torchtitan: achieved training FLOPs per
second over the device's dense bf16 peak from a table keyed by device name.
CPU and unknown devices have no honest peak, so their MFU is null unless the
user passes `--peak-tflops`.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any

# Dense bf16 tensor-core peak, TFLOP/s per device (datasheets; sparsity excluded).
# Matched in order against torch.cuda.get_device_name(), first hit wins.
# MIG slices are scaled by their share of the GPU's compute (see peak_flops).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800 PCIe", 756.0),
    ("H800", 989.0),  # SXM
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 (no bf16 on Volta)
    ("T4", 65.0),  # fp16
)


def peak_flops(device_name: str | None, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU, unlisted GPU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12 * _mig_share(device_name)
    return None


_MIG_RE = re.compile(r"MIG\s+(\d+)g\.", re.IGNORECASE)


def _mig_share(device_name: str) -> float:
    """A MIG slice "...MIG 3g.40gb" has 3 of the GPU's 7 compute slices (A100, H100, H200)."""
    match = _MIG_RE.search(device_name)
    return int(match.group(1)) / 7 if match else 1.0


def mfu(
    flops_per_token: float, tokens_per_sec: float, world_size: int, peak: float | None
) -> float | None:
    """Fraction of the cluster's peak that the model's training FLOPs achieve."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / (peak * world_size)


def environment() -> dict[str, Any]:
    """Versions and hardware, stored beside every result (modded-nanogpt's habit)."""
    import ray
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
        "host_device": device,
        "cpu_count": os.cpu_count(),
    }


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(row: dict[str, Any], max_steps: int, eta_seconds: float | None) -> str:
    """One human line per log interval: step, losses, lr, throughput, MFU, ETA."""
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['train_loss']:.4f}"]
    if row.get("val_loss") is not None:
        parts.append(f"val {row['val_loss']:.4f}")
    if row.get("hellaswag_acc_norm") is not None:
        parts.append(f"hellaswag {row['hellaswag_acc_norm']:.4f}")
    parts.append(f"lr {row['lr']:.2e}")
    if row.get("tokens_per_sec") is None and row.get("step_time_ms") is not None:
        # An attempt's first step (step_stats.py): its time is compile and warm-up.
        parts.append(f"first step {row['step_time_ms'] / 1000:.1f}s (compile, warm-up)")
    else:
        parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
        parts.append(f"mfu {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "mfu n/a")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)
