"""Where a rank's results go: rank 0's step rows and run record, and the reports (with
checkpoints) that Ray Train or Tune receive.

A run reports one of three ways. A worker group's rank reports to Ray Train, which
persists the checkpoint. An in-process run (Ray Train's local mode) has no storage
context, so its checkpoints are written here into the run folder under the names
Ray Train would use. A one-worker sweep trial runs in its Tune trial's own process
and reports to Tune directly, so Tune's restore, retries and PBT's cloning work on
its checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from raygpt import checkpoint, results
from raygpt.config.train import TrainConfig
from raygpt.storage import Storage
from raygpt.train import metrics
from raygpt.train.lr_schedule import lr_at
from raygpt.train.step_stats import StepReading
from raygpt.train.wiring import RunWiring


def world(wiring: RunWiring) -> tuple[int, int, str]:
    """(rank, world size, run name). Ray refuses `ray.train.get_context()` inside a Tune
    function, which is where a one-worker sweep trial runs this loop (local mode): one
    rank, named by the driver."""
    if wiring.tune_session:
        return 0, 1, wiring.run_name or ""
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), context.get_experiment_name()


def step_row(
    reading: StepReading,
    cfg: TrainConfig,
    identity: dict[str, Any],
    tokens_per_step: int,
    flops_per_token: int,
    world_size: int,
    peak: float | None,
) -> dict[str, Any]:
    """One step's row of the run's step parts; evaluations fill in their columns later."""
    # The attempt's first step is compile and warm-up more than training: its time is kept
    # (train_seconds), its throughput is not (summaries' means skip nulls).
    tokens_per_sec = None if reading.first else tokens_per_step / max(reading.seconds, 1e-9)
    return {
        "step": reading.step,
        "tokens_seen": reading.step * tokens_per_step,
        "train_loss": reading.train_loss,
        "val_loss": None,
        "eval_train_loss": None,
        "lr": lr_at(reading.step - 1, cfg),  # the rate of that update
        "grad_norm": reading.grad_norm,
        "step_time_ms": reading.seconds * 1000,
        "tokens_per_sec": tokens_per_sec,
        "mfu": None
        if tokens_per_sec is None
        else metrics.mfu(flops_per_token, tokens_per_sec, world_size, peak),
        **identity,
    }


def model_size(model, flops_per_token: int) -> dict[str, int]:
    """The model as built (a pretrained one has its own shape): what the sweep's trials
    table counts a trial's size and FLOPs from."""
    return {
        "n_params": model.n_params(),
        "flops_per_token": flops_per_token,
        "n_layer": model.config.n_layer,
        "n_embd": model.config.n_embd,
    }


def report_metrics(
    *,
    step: int,
    tokens_seen: int,
    train_loss: float,
    last_val: float | None,
    rung_val: float | None,
    cooldown_seconds: float,
    best_val: float,
    evaluated: bool,
    lr: float,
    diverged: bool,
    done: bool,
    hellaswag: float | None,
    timeline: dict[str, float],
    model_size: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What one report tells Ray Train or Tune (and, through Tune, the trial scheduler).

    `model_size` (see model_size) goes into every report: the sweep's trials table
    counts each trial's FLOPs from it.
    """
    return {
        "step": step,
        "tokens_seen": tokens_seen,
        "train_loss": train_loss,
        # Tune needs the metric in every result: a checkpoint-only report repeats the last
        # val loss (inf before the first eval; ASHA's rungs are evals).
        "val_loss": last_val if last_val is not None else math.inf,
        # What ASHA ranks when the sweep asks for rung cooldowns: the cooled copy's val at
        # a rung, the plain val elsewhere.
        "rung_val_loss": rung_val if rung_val is not None else math.inf,
        "cooldown_seconds": cooldown_seconds,  # this attempt's, so far
        "best_val_loss": best_val,
        "evaluated": evaluated,
        "lr": lr,
        "diverged": diverged,
        "done": done,
        **({"hellaswag_acc_norm": hellaswag} if hellaswag is not None else {}),
        # When this attempt's worker came up, began and (so far) ended its steps: the
        # sweep's per-trial timeline.
        **timeline,
        **(model_size or {}),
        "last_step_at": time.time(),
    }


def report(
    metrics_: dict[str, Any],
    state: dict[str, Any] | None,
    step: int,
    *,
    tune_session: bool,
    in_process: bool,
    run: Storage,
    run_path: str,
    keep: int | None,
    upload: str,
) -> None:
    """Report `metrics_` (with a checkpoint of `state` when rank 0 passes one) the way
    this run reports."""
    if tune_session:
        _report_to_tune(metrics_, state)
    elif in_process:
        _save_in_process(run, run_path, state, step, keep)
        ray.train.report(metrics_)
    else:
        _report_to_train(metrics_, state, step, upload)


def _report_to_tune(report: dict[str, Any], state: dict[str, Any] | None) -> None:
    """`ray.tune.report`, with the state as a Tune checkpoint when there is one. Tune
    persists it to the sweep's storage before returning, so the folder can go."""
    import ray.tune

    if state is None:
        ray.tune.report(report)
        return
    with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as tmp:
        checkpoint.save(tmp, state)
        ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def _save_in_process(
    run: Storage, run_path: str, state: dict[str, Any] | None, step: int, keep: int | None
) -> None:
    """Checkpoint an in-process run to its folder, as Ray Train would for a worker group.

    Same folder names and files, so resume, `raygpt.sample` and the worker-group path
    read them alike. The older folders beyond `keep` go, oldest first, after the new
    one is complete.
    """
    if state is None:
        return
    with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as tmp:
        checkpoint.save(tmp, state)
        run.upload_dir(tmp, f"{run_path}/{checkpoint.checkpoint_dir_name(step)}")
    if keep:
        for old in checkpoint.checkpoints_in_run(run_path, run)[keep:]:
            run.delete_dir(old)


def _report_to_train(
    metrics_: dict[str, Any], state: dict[str, Any] | None, step: int, upload: str
) -> None:
    """`ray.train.report`, with a checkpoint of `state` when rank 0 passes one.

    Async upload: Ray copies the folder to storage in a thread and deletes it
    afterwards, so the ranks go on training instead of waiting on storage.
    """
    if state is None:
        ray.train.report(metrics_)
        return
    from ray.train import CheckpointUploadMode

    tmp = tempfile.mkdtemp(prefix="raygpt-ckpt-")
    asynchronous = upload == "async"
    try:
        checkpoint.save(tmp, state)
        ray.train.report(
            metrics_,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint.checkpoint_dir_name(step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC
            if asynchronous
            else CheckpointUploadMode.SYNC,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not asynchronous:
        shutil.rmtree(tmp, ignore_errors=True)


def step_zero(
    losses: dict[str, float], row_identity: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step row and the report of an --eval-only run: the initial model's losses."""
    row = {
        "step": 0,
        "tokens_seen": 0,
        "train_loss": None,  # no training step was taken
        "val_loss": losses["val"],
        "eval_train_loss": losses["train"],
        **row_identity,
    }
    report = {
        "step": 0,
        "tokens_seen": 0,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "best_val_loss": losses["val"],
        "evaluated": True,
        "lr": 0.0,
        "diverged": not math.isfinite(losses["val"]),
        "done": True,
    }
    return row, report


def describe_workers(device: torch.device, world_size: int) -> list[dict[str, Any]]:
    """Every rank's host and device, gathered on all ranks: what the run really ran on."""
    import socket

    mine: dict[str, Any] = {"host": socket.gethostname(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mine |= {
            "device_name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    else:
        mine |= {"device_name": None, "cpu_threads": torch.get_num_threads()}
    if world_size == 1:
        return [mine | {"rank": 0}]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return [w | {"rank": r} for r, w in enumerate(gathered)]


def record_workers(run: Storage, run_path: str, workers: list[dict[str, Any]]) -> None:
    """Add the ranks' hardware to run.json (the driver wrote what it could see from its
    own machine, which on a cluster is not where training runs)."""
    path = f"{run_path}/{results.RUN_FILE}"
    if not run.exists(path):
        return  # a sweep trial: its hardware rides in the step parts' metadata
    info = json.loads(run.read_bytes(path))
    info["workers"] = workers
    results.write_json(run, path, info)
