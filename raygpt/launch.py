"""Ray plumbing shared by `raygpt.train` and `raygpt.sweep`.

Connecting to (or starting) a cluster, checking up front that a request fits
it, guarding run folders against being clobbered, and building the
`TorchTrainer` that runs `loop.train_loop_per_worker`.

Why the up-front fit check: Ray Train retries a worker group that cannot be
placed forever, so an impossible `--num-workers` would hang instead of failing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from raygpt.config import TrainConfig
from raygpt.errors import UserError

DASHBOARD_HOST_ENV = "RAYGPT_DASHBOARD_HOST"


def connect(address: str | None) -> None:
    """Join `address`, or start a private local cluster sized to this machine.

    A local cluster gets at least 4 logical CPUs: on a 2-core laptop the trial
    actor and the controller need slots beside the training workers.
    """
    if ray.is_initialized():
        return
    # Tune's built-in CSV/JSON/TBX loggers would copy every step row into each
    # trial folder; raygpt writes Parquet and TensorBoard itself.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(
                f"cannot connect to the Ray cluster at {address!r} ({str(err).splitlines()[0]}); "
                "start it with `ray start --head` or `ray up`, or leave out --address"
            ) from None
        return
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 4),
        include_dashboard=True,
        dashboard_host=os.environ.get(DASHBOARD_HOST_ENV, "127.0.0.1"),
        log_to_driver=True,
    )


def resolve_use_gpu(use_gpu: str) -> bool:
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return use_gpu == "true"


def check_fits(
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    what: str = "this run",
    concurrent: int = 1,
) -> None:
    """Raise UserError unless `num_workers` bundles can be placed on the live cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    per_node = [
        min(int(res.get(k, 0) // v) if v > 0 else num_workers for k, v in need.items())
        for res in nodes
    ]
    total_cpu = sum(res.get("CPU", 0) for res in nodes)
    total_gpu = sum(res.get("GPU", 0) for res in nodes)
    if sum(per_node) >= num_workers * concurrent:
        return
    if max(per_node, default=0) == 0:
        biggest_cpu = max((res.get("CPU", 0) for res in nodes), default=0)
        biggest_gpu = max((res.get("GPU", 0) for res in nodes), default=0)
        raise UserError(
            f"{what} asks for {cpus_per_worker:g} CPU and {gpus_per_worker:g} GPU per worker, but "
            f"the largest node has {biggest_cpu:g} CPU and {biggest_gpu:g} GPU; lower "
            "--cpus-per-worker or --use-gpu, or add bigger nodes"
        )
    raise UserError(
        f"{what} needs {num_workers} workers x {cpus_per_worker:g} CPU"
        + (f" x {gpus_per_worker:g} GPU" if gpus_per_worker else "")
        + f" but the cluster ({len(nodes)} node(s), {total_cpu:g} CPU, {total_gpu:g} GPU) "
        f"can host {sum(per_node)}; lower --num-workers or add nodes"
    )


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, kind: str = "run") -> None:
    """Refuse to clobber an existing run, or to resume one that does not exist."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume and not exists:
        raise UserError(
            f"cannot resume: no {kind} named {run_dir.name!r} in {run_dir.parent}; "
            "check --name and --storage-path"
        )
    if exists and not resume:
        if not overwrite:
            raise UserError(
                f"a {kind} named {run_dir.name!r} already exists in {run_dir.parent}; "
                "pass --resume to continue it, --overwrite to replace it, or a new --name"
            )
        shutil.rmtree(run_dir)


def build_trainer(
    cfg: TrainConfig,
    name: str,
    storage_path: str,
    use_gpu: bool,
    callbacks: Sequence[Any] = (),
    run_info: dict[str, Any] | None = None,
):
    """A TorchTrainer running the single training loop with `cfg`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygpt.loop import train_loop_per_worker

    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "run_info": run_info or {}},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=list(callbacks),
            # Ray Train logs every report (our step rows included) at INFO: too loud.
            logging_config=LoggingConfig(log_level="WARNING"),
            # Ray's print patch would echo each progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def find_user_error(exc: BaseException | None, _seen: set[int] | None = None) -> UserError | None:
    """The UserError behind a Ray failure (worker errors arrive wrapped), if any."""
    seen = _seen if _seen is not None else set()
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, UserError):
        return exc
    nested = [exc.__cause__, exc.__context__]
    nested += list(getattr(exc, "worker_failures", {}).values())
    nested.append(getattr(exc, "controller_failure", None))
    if hasattr(exc, "as_instanceof_cause"):
        try:
            nested.append(exc.as_instanceof_cause())
        except Exception:  # noqa: BLE001 - best effort unwrapping only
            pass
    nested.append(getattr(exc, "cause", None))
    for inner in nested:
        if (found := find_user_error(inner, seen)) is not None:
            return found
    # A worker's UserError can arrive only as text in a traceback string.
    text = str(exc)
    marker = "raygpt.errors.UserError: "
    if marker in text:
        return UserError(text.split(marker, 1)[1].splitlines()[0])
    return None


def storage_root(storage_path: str) -> str:
    """Absolute storage path; URIs (s3://, gs://) pass through for shared storage."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())
