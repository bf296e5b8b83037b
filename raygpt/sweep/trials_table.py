"""The sweep driver's record of its trials: trials.parquet, kept live by a Tune callback.

Step rows and TensorBoard events are written by each trial's rank 0 (see
results.py); this callback reads a trial's rows when it ends, to sum up its
compute, and once more at the end of the sweep, for parts a stopped trial's
workers wrote after Tune's decision. trials.parquet is one small file rewritten
whole (a single PUT on object storage) every few seconds and whenever a trial
ends.

Each row carries the trial's timeline (queued, started, workers up, first and
last step, torn down), so the overhead a sweep pays per trial is a column, not
a guess, and its compute: the model's size (from the trial's config, then as its
model reports it), training FLOPs, device-seconds and GPU-hours (raygpt/report/
compute.py counts them).

It is pickled with the Tuner's state; only the storage, paths and settings
survive pickling, and the trials table is reloaded from trials.parquet, so a
restored sweep continues the same table.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from raygpt import results, status
from raygpt.report import compute
from raygpt.storage import Storage
from raygpt.sweep.search import config_key, trial_params

# Timeline values the loop reports (the first attempt's for the start, the latest for the end).
FIRST_REPORTED = ("workers_up_at", "first_step_at")
LAST_REPORTED = ("last_step_at",)
# The model's size as the trial's model reports it (train/reporting.py's model_size).
SIZE_REPORTED = ("n_params", "n_layer", "n_embd")


class SweepOutputs(Callback):
    """Tune callback on the driver: trials.parquet, live, and one line per finished trial."""

    WRITE_EVERY_S = 5.0

    def __init__(
        self,
        store: Storage,
        sweep_path: str,
        metadata: dict[str, Any],
        max_steps: int,
        base_seed: int,
        phase: str = "search",
        target_loss: float | None = None,
        announce: bool = True,
        workers: int = 1,
        gpus_per_worker: float = 0.0,
    ):
        self.store = store
        self.sweep_path = sweep_path
        self.metadata = metadata
        self.max_steps = max_steps
        self.base_seed = base_seed
        self.phase = phase
        self.target_loss = target_loss
        self.announce = announce
        self.workers = workers  # each trial's: its device-seconds are time x devices
        self.gpus_per_worker = gpus_per_worker  # 0: CPU workers
        self._reset()

    # A callback pickled before the devices were kept restores with these.
    workers = 1
    gpus_per_worker = 0.0
    _KEPT = (
        "store",
        "sweep_path",
        "metadata",
        "max_steps",
        "base_seed",
        "phase",
        "target_loss",
        "announce",
        "workers",
        "gpus_per_worker",
    )

    def _reset(self) -> None:
        self._trials: dict[str, dict[str, Any]] | None = None
        self._started: dict[str, float] = {}
        self._queued: dict[str, float] = {}
        self._last_write = 0.0
        self._held_back = False  # a throttled write that on_step_end still owes the file

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._KEPT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def trials_path(self) -> str:
        return f"{self.sweep_path}/{results.TRIALS_FILE}"

    # -- state
    def _load(self) -> dict[str, dict[str, Any]]:
        if self._trials is None:
            self._trials = {}
            table = results.read_table(self.store, self.trials_path)
            if table is not None:
                table = results.conform(table, results.TRIAL_SCHEMA)
            for row in table.to_pylist() if table is not None else []:
                self._trials[row["trial_id"]] = row
        return self._trials

    def records(self) -> list[dict[str, Any]]:
        return list(self._load().values())

    def _record(self, trial) -> dict[str, Any]:
        trials = self._load()
        record = trials.get(trial.trial_id)
        if record is None:
            params = trial_params(trial.config, self.base_seed)
            config = self.metadata.get("config") if isinstance(self.metadata, dict) else None
            config = {**(config or {}), **params}
            record = {col: None for col in results.TRIAL_SCHEMA.names} | {
                "trial_id": trial.trial_id,
                "optimizer": params["optimizer"],
                "learning_rate": params["learning_rate"],
                "momentum": params.get("momentum") if params["optimizer"] == "momentum" else None,
                "params": json.dumps(params),
                "seed": params.get("seed", self.base_seed),
                "config_key": config_key(params),
                "phase": self.phase,
                "status": status.RUNNING,
                "steps": 0,
                "wall_seconds": 0.0,
                "queued_at": self._queued.get(trial.trial_id),
                # Until the trial's model reports its own (a pretrained one has its shape).
                "n_layer": config.get("n_layer"),
                "n_embd": config.get("n_embd"),
                "parametrization": config.get("parametrization") or "sp",
            }
            trials[trial.trial_id] = record
        return record

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self.WRITE_EVERY_S:
            self._held_back = True
            return
        self._last_write = now
        self._held_back = False
        rows = [self._trials[k] for k in sorted(self._trials)]
        table = results.pa.Table.from_pylist(rows, schema=results.TRIAL_SCHEMA)
        results.write_table(
            self.store, self.trials_path, results.with_metadata(table, self.metadata)
        )

    def _finish(self, trial, errored: bool, error: str | None = None) -> None:
        record = self._record(trial)
        record["torn_down_at"] = time.time()
        self._summarise_steps(record)
        record["status"] = status.decide(
            errored=errored,
            diverged=bool(record.pop("diverged_flag", False)),
            steps=record["steps"],
            max_steps=self.max_steps,
        )
        record["error"] = error
        self._account_wall(trial.trial_id, record)
        self._write(force=True)
        if self.announce:
            print(finished_line(record), flush=True)

    def _account_wall(self, trial_id: str, record: dict[str, Any]) -> None:
        started = self._started.pop(trial_id, None)
        if started is not None:
            record["wall_seconds"] = (record["wall_seconds"] or 0.0) + time.time() - started
        record["overhead_seconds"] = overhead_seconds(record)

    def _summarise_steps(self, record: dict[str, Any]) -> None:
        """Compute totals from the trial's own step parts (read once, at its end)."""
        table, _ = results.read_steps(
            self.store, f"{self.sweep_path}/{results.RUNS_DIR}/{record['trial_id']}"
        )
        rows = table.to_pylist() if table is not None else []
        if not rows:
            return
        speeds = [r["tokens_per_sec"] for r in rows if r["tokens_per_sec"]]
        mfus = [r["mfu"] for r in rows if r["mfu"] is not None]
        # Steps actually trained: a stopped trial's workers may finish a report or
        # two after the decision, and that compute counts too.
        record["steps"] = max(record["steps"] or 0, rows[-1]["step"])
        record["train_seconds"] = sum(r["step_time_ms"] or 0.0 for r in rows) / 1000
        record["tokens"] = rows[-1]["tokens_seen"]
        record["mean_tokens_per_sec"] = float(np.mean(speeds)) if speeds else None
        record["mean_mfu"] = float(np.mean(mfus)) if mfus else None
        record["final_train_loss"] = rows[-1]["train_loss"]
        record["steps_to_target"] = steps_to_target(rows, self.target_loss)
        self._account_compute(record)

    def _account_compute(self, record: dict[str, Any]) -> None:
        """FLOPs, device-seconds and GPU-hours from the trial's tokens and training time
        (its steps' and its rung cooldowns')."""
        per_token = record.get("_flops_per_token")
        if per_token is None and record.get("flops") and record.get("tokens"):
            # Reloaded from trials.parquet (a restored sweep): the rate of its last count.
            per_token = record["flops"] / record["tokens"]
        seconds = record.get("train_seconds")
        if seconds is not None:
            seconds += record.get("cooldown_seconds") or 0.0
        record |= compute.trial_compute(
            seconds, record.get("tokens"), per_token, self.workers, self.gpus_per_worker
        )

    # -- Tune callback hooks
    def setup(self, **info) -> None:
        self._load()

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.time()
        for trial in trials:
            self._queued.setdefault(trial.trial_id, now)

    def on_step_end(self, iteration, trials, **info) -> None:
        # A result the throttle held back reaches the file even when no event follows it:
        # a trial that stalls after a checkpoint still shows that checkpoint.
        if self._held_back:
            self._write()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._queued.setdefault(trial.trial_id, time.time())
        record = self._record(trial)
        record["status"] = status.RUNNING
        params = trial_params(trial.config, self.base_seed)
        if json.dumps(params) != record["params"]:
            # PBT restarted it with a better trial's checkpoint and a perturbed config.
            record |= {
                "optimizer": params["optimizer"],
                "learning_rate": params["learning_rate"],
                "params": json.dumps(params),
                "config_key": config_key(params),
            }
        now = time.time()
        self._started[trial.trial_id] = now
        record["started_at"] = record["started_at"] or now
        self._write(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self._record(trial)
        record["steps"] = result.get("step", record["steps"])
        record["final_train_loss"] = result.get("train_loss")
        if result.get("evaluated", True):
            record["best_val_loss"] = result.get("best_val_loss")
            record["final_val_loss"] = result.get("val_loss")
        record["checkpoint_path"] = _checkpoint_path(trial, result) or record["checkpoint_path"]
        for key in FIRST_REPORTED:
            if record[key] is None and result.get(key) is not None:
                record[key] = float(result[key])
        if result.get("hellaswag_acc_norm") is not None:
            record["hellaswag_acc_norm"] = float(result["hellaswag_acc_norm"])
        if result.get("cooldown_seconds") is not None:
            record["cooldown_seconds"] = float(result["cooldown_seconds"])
        for key in SIZE_REPORTED:
            if result.get(key) is not None:
                record[key] = int(result[key])
        if result.get("flops_per_token") is not None:
            record["_flops_per_token"] = float(result["flops_per_token"])
        for key in LAST_REPORTED:
            if result.get(key) is not None:
                record[key] = float(result[key])
        if result.get("diverged"):
            record["diverged_flag"] = True
        self._write()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True, error=trial_error_line(trial))

    def on_experiment_end(self, trials, **info) -> None:
        # A stopped trial's rank 0 may write a part or two after Tune's decision (its
        # workers finish the step in hand); with every trial torn down, count them too.
        for record in self._load().values():
            if record["status"] != status.RUNNING and record["phase"] == self.phase:
                self._summarise_steps(record)
                record["overhead_seconds"] = overhead_seconds(record)
        self._write(force=True)


def _checkpoint_path(trial, result: dict[str, Any]) -> str | None:
    """Where the trial's latest checkpoint is: Tune's own (one-worker trials report to
    Tune), or the one Ray Train's TuneReportCallback names."""
    if result.get("checkpoint_path"):
        return result["checkpoint_path"]
    with contextlib.suppress(Exception):  # the trial may not have one yet
        latest = trial.checkpoint
        if latest is not None:
            return latest.path
    return None


def overhead_seconds(record: dict[str, Any]) -> float | None:
    """A trial's time outside its steps and evaluations: start-up (process, imports,
    data, model) up to its first step, and teardown after its last."""
    times = [record.get(k) for k in ("started_at", "first_step_at", "last_step_at")]
    end = record.get("torn_down_at")
    if None in times or end is None:
        return None
    started, first, last = times
    return max(0.0, first - started) + max(0.0, end - last)


def steps_to_target(rows: list[dict[str, Any]], target: float | None) -> int | None:
    """The first evaluated step whose val loss is at or below `target` (None: never)."""
    if target is None:
        return None
    for row in rows:
        val = row.get("val_loss")
        if val is not None and math.isfinite(val) and val <= target:
            return int(row["step"])
    return None


def finished_line(record: dict[str, Any]) -> str:
    outcome = f"{record['status']} at step {record['steps']}"
    if record["status"] == status.ERROR:
        outcome += f": {record['error']}"
    elif record["best_val_loss"] is not None:
        outcome += f" (val {record['best_val_loss']:.4f})"
    seed = f" seed {record['seed']}" if record.get("seed") is not None else ""
    return (
        f"[sweep] trial {record['trial_id']} {record['optimizer']} "
        f"lr={record['learning_rate']:.3g}{seed}: {outcome}"
    )


def trial_error_line(trial) -> str:
    """The one line that says why a trial failed: a raygpt UserError's message, else the
    last line of its traceback that names an exception."""
    text = ""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).exists():
        text = Path(error_file).read_text(errors="replace")
    elif hasattr(trial, "get_error"):
        with contextlib.suppress(Exception):  # best effort: the error stays in Ray's logs
            text = str(trial.get_error() or "")
    return error_line(text)


def error_line(text: str) -> str:
    marker = "raygpt.errors.UserError: "
    if marker in text:
        return text.rsplit(marker, 1)[1].splitlines()[0].strip()[:500]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and ":" in line:
            return line[:500]
    return lines[-1][:500] if lines else "unknown error (see the trial's error.txt)"
