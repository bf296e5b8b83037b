"""The `TorchTrainer` that runs the one training loop: in this process (Ray Train's local mode)
or as a worker group, with the environment raygpt forwards to Ray processes."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import ray

from raygpt.cluster.connect import find_cluster
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.storage import Storage
from raygpt.train.wiring import RunWiring

CONTROLLER_POLL_S = "0.25"
# Ray Train waits this long for a worker group's resources, then retries the start as a
# controller failure (forever, by default).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_WAIT_S = 60.0


def start_retries(start_timeout_s: float) -> tuple[float, int]:
    """(seconds one start attempt waits, controller retries) so that a worker group
    that cannot be placed fails after about `start_timeout_s` (0: never)."""
    if start_timeout_s == 0:
        return START_WAIT_S, -1
    wait = min(START_WAIT_S, start_timeout_s)
    return wait, max(0, math.ceil(start_timeout_s / wait) - 1)


IN_PROCESS_LINE = "running in this process (Ray Train local mode): no Ray cluster to start"


def runs_in_process(cfg: TrainConfig) -> bool:
    """Whether the run's one worker runs in this process (`in_process`, see config/train.py).

    auto says yes only where a worker group would buy nothing: one worker, and no
    cluster running or named, so Ray would start a private cluster just to host one
    process (about 20 s on a laptop, and its daemons then share the cores).
    """
    if cfg.in_process == "true":
        if cfg.num_workers != 1:
            raise UserError(
                f"in_process=true runs one worker, but num_workers={cfg.num_workers}; "
                "use --num-workers 1 or --in-process false"
            )
        return True
    if cfg.in_process == "false" or cfg.num_workers != 1 or ray.is_initialized():
        return False
    target, _ = find_cluster(cfg.address)
    return target is None


def in_process_use_gpu(use_gpu: str) -> bool:
    import torch

    if use_gpu == "true" and not torch.cuda.is_available():
        raise UserError("use_gpu=true but this machine has no usable CUDA GPU; use --use-gpu auto")
    return torch.cuda.is_available() if use_gpu == "auto" else use_gpu == "true"


def build_trainer(
    cfg: TrainConfig,
    name: str,
    storage: Storage,
    use_gpu: bool,
    callbacks: Sequence[Any] = (),
    run_info: dict[str, Any] | None = None,
    wiring: RunWiring | None = None,
    in_process: bool = False,
    gpus_per_worker: float = 1.0,
):
    """A TorchTrainer running the single training loop with `cfg`, its run folder
    `<storage>/<name>`. `wiring` says where the loop writes what Ray does not
    (wiring.py); `run_info` is stamped on every step row. `in_process`: Ray
    Train's local mode (`num_workers=0`), the loop runs in this process."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygpt.train.loop import train_loop_per_worker

    wiring = dataclasses.replace(wiring or RunWiring(storage=storage), storage=storage)
    if in_process:
        # Ray Train announces local mode at INFO on the console; the run's own line says it.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        wiring = dataclasses.replace(
            wiring,
            in_process=True,
            run_path=storage.path(name),
            run_name=name,
            device="cuda" if use_gpu else "cpu",
        )
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": cfg.to_dict(),
                "run_info": run_info or {},
                "wiring": wiring,
            },
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(name=name),
        )
    # Each report waits for the controller's next poll of the workers (Ray's
    # default: every 2 s), so frequent evals of a small model would spend most
    # of their time blocked in ray.train.report. Ray hands this to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    start_wait, start_attempts = start_retries(cfg.start_timeout_s)
    os.environ[START_TIMEOUT_ENV] = f"{start_wait:g}"  # the driver's env reaches the controller
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "run_info": run_info or {}, "wiring": wiring},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            # With a filesystem given, Ray takes the path inside it (no scheme).
            storage_path=storage.root,
            storage_filesystem=storage.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(
                max_failures=cfg.max_failures, controller_failure_limit=start_attempts
            ),
            callbacks=list(callbacks),
            # Ray Train logs every report (our step rows included) at INFO: too loud.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )


def raygpt_env() -> dict[str, str]:
    """raygpt's own settings (data cache, fault drills), to forward to Ray processes."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAYGPT_")}


def _worker_env() -> dict[str, str]:
    # Ray's print patch would echo each progress line twice.
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **raygpt_env()}
