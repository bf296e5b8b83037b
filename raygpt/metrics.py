"""Throughput, MFU and the files results live in: Parquet and TensorBoard.

MFU (model FLOPs utilisation) follows torchtitan: achieved training FLOPs per
second over the device's dense bf16 peak from a table keyed by device name.
CPU and unknown devices have no honest peak, so their MFU is null unless the
user passes `--peak-tflops`.

Step rows travel from rank 0 to whoever receives the reports (the train CLI's
controller callback, the sweep driver's Tune callback) and are written there by
`StepLog`: one Parquet file rewritten atomically, keyed by (trial_id, step) so
that a step replayed after a restart replaces its first copy instead of
duplicating it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Dense bf16 tensor-core peak, TFLOP/s per device (datasheets; sparsity excluded).
# Matched in order against torch.cuda.get_device_name(), first hit wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
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
            return tflops * 1e12
    return None


def mfu(
    flops_per_token: float, tokens_per_sec: float, world_size: int, peak: float | None
) -> float | None:
    """Fraction of the cluster's peak that the model's training FLOPs achieve."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / (peak * world_size)


# --------------------------------------------------------------------------- Parquet

STEP_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("trial_id", pa.string()),
        ("optimizer", pa.string()),
        ("learning_rate", pa.float64()),
        ("step", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("train_loss", pa.float64()),
        ("val_loss", pa.float64()),
        ("eval_train_loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("step_time_ms", pa.float64()),
        ("tokens_per_sec", pa.float64()),
        ("mfu", pa.float64()),
    ]
)
STEP_COLUMNS = tuple(STEP_SCHEMA.names)


# One row per sweep trial. status: running | completed | stopped_early | diverged | error
TRIAL_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("optimizer", pa.string()),
        ("learning_rate", pa.float64()),
        ("momentum", pa.float64()),  # sampled for optimizer = momentum only, else null
        ("params", pa.string()),  # every sampled hyperparameter, as JSON
        ("status", pa.string()),
        ("error", pa.string()),
        ("steps", pa.int64()),
        ("best_val_loss", pa.float64()),
        ("final_train_loss", pa.float64()),
        ("final_val_loss", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("train_seconds", pa.float64()),  # sum of step times
        ("tokens", pa.int64()),
        ("mean_tokens_per_sec", pa.float64()),
        ("mean_mfu", pa.float64()),
        ("checkpoint_path", pa.string()),
    ]
)


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


def write_parquet_atomic(table: pa.Table, path: str | Path) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    encoded = {
        f"raygpt.{k}".encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()
    }
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **encoded})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `raygpt.*` metadata of a Parquet file, decoded."""
    raw = pq.read_schema(path).metadata or {}
    return {
        k.decode().removeprefix("raygpt."): json.loads(v)
        for k, v in raw.items()
        if k.startswith(b"raygpt.")
    }


class StepLog:
    """Per-step rows of one or many runs, deduplicated on (trial_id, step)."""

    def __init__(self, path: str | Path | None = None, metadata: dict[str, Any] | None = None):
        self.path = None if path is None else Path(path)
        self.metadata = dict(metadata or {})
        self._rows: dict[tuple[str, int], dict[str, Any]] = {}
        if self.path is not None and self.path.exists():  # a resumed run keeps what it wrote
            for row in pq.read_table(self.path).to_pylist():
                self._rows[(row["trial_id"] or "", row["step"])] = row

    def add(self, rows: Iterable[dict[str, Any]], **common: Any) -> list[dict[str, Any]]:
        """Insert or replace rows; return those whose step is new (for TensorBoard)."""
        fresh = []
        for row in rows:
            full = (
                {col: None for col in STEP_COLUMNS}
                | {k: row.get(k) for k in STEP_COLUMNS if k in row}
                | common
            )
            key = (full["trial_id"] or "", int(full["step"]))
            if key not in self._rows:
                fresh.append(full)
            self._rows[key] = full
        return fresh

    def rows_for(self, trial_id: str) -> list[dict[str, Any]]:
        return [self._rows[k] for k in sorted(self._rows) if k[0] == trial_id]

    def last_step(self, trial_id: str = "") -> int:
        return max((s for t, s in self._rows if t == trial_id), default=0)

    def __len__(self) -> int:
        return len(self._rows)

    def table(self) -> pa.Table:
        rows = [self._rows[k] for k in sorted(self._rows)]
        return with_metadata(pa.Table.from_pylist(rows, schema=STEP_SCHEMA), self.metadata)

    def write(self) -> None:
        write_parquet_atomic(self.table(), self.path)


ROWS_FILE = "steps.jsonl"


def rows_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ROWS_FILE


class RowLog:
    """Append-only JSON-lines log of step rows, written by rank 0 beside its checkpoints.

    Each append is flushed and fsynced before the report that announces it, so
    the log is at least as durable as the checkpoints. A step replayed after a
    restart is appended again; readers keep the last copy of each step.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())


class RowTail:
    """Reads the rows appended to a RowLog since the last call (complete lines only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


# --------------------------------------------------------------------------- TensorBoard

TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "eval_train_loss": "loss/train_eval",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_sec": "perf/tokens_per_sec",
    "step_time_ms": "perf/step_time_ms",
    "mfu": "perf/mfu",
}


class TensorBoardLog:
    """Scalars against the training step, one event file per run directory."""

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(logdir))

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            for key, tag in TENSORBOARD_TAGS.items():
                value = row.get(key)
                if value is not None:
                    self._writer.add_scalar(tag, value, global_step=int(row["step"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


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
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
    parts.append(f"mfu {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "mfu n/a")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return " | ".join(parts)
