"""Ray plumbing shared by `raygpt.train` and `raygpt.sweep`.

Connecting to (or starting) a cluster, the checks that run before Ray starts
(data, pretrained fit, resume compatibility, run folders), checking up front
that a request fits the cluster, and building the `TorchTrainer` that runs
`loop.train_loop_per_worker`.

Why the up-front fit check: Ray Train retries a worker group that cannot be
placed forever, so an impossible `--num-workers` would hang instead of failing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray

from raygpt import checkpoint, data, trained
from raygpt.config import TrainConfig
from raygpt.errors import UserError
from raygpt.storage import Storage

DASHBOARD_HOST_ENV = "RAYGPT_DASHBOARD_HOST"
CONTROLLER_POLL_S = "0.25"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def connect(address: str | None, dashboard: bool = True, log_to_driver: bool = True) -> str:
    """Join a Ray cluster the way `ray.init()` does, or start a private one; say which.

    `address` None: RAY_ADDRESS (set inside `ray job submit` jobs), else the
    cluster that `ray start`/`ray up` started on this machine, else a private
    local cluster. "local": always a private one (the tests use it). Anything
    else ("auto", "host:port", "ray://..."): join it or fail in one line.
    Returns the line printed, which names the cluster and its size.
    `dashboard` False starts a private cluster without the dashboard's ~300 MB of
    processes (a batch job such as `raygpt.data prepare` has no use for it).
    `log_to_driver` False leaves the workers' output in Ray's log files instead of
    forwarding it to this console (a sweep's trials keep their own log files).
    """
    if ray.is_initialized():
        return describe_cluster("connected to")
    # Tune's built-in CSV/JSON/TBX loggers would copy every step row into each
    # trial folder; raygpt writes Parquet and TensorBoard itself.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    target, source = _find_cluster(address)
    if target is None:
        _start_private(dashboard, log_to_driver)
        line = describe_cluster("started a private Ray cluster on this machine:")
    else:
        try:
            with _startup_logs_on_stdout():
                # A cluster found on this machine is joined the way `ray.init()` joins it,
                # which also picks up the token of a cluster with token authentication.
                found_here = source == _FOUND_HERE
                ray.init(address=None if found_here else target, log_to_driver=log_to_driver)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(_join_error(target, source, err)) from None
        line = describe_cluster(f"joined the Ray cluster at {target} ({source}):")
    print(f"[raygpt] {line}", flush=True)
    return line


_FOUND_HERE = "the cluster `ray start` runs on this machine"


def _join_error(target: str, source: str, err: BaseException) -> str:
    text = " ".join(str(err).split())
    if "AuthToken" in text or "Authentication" in type(err).__name__ + text:
        return (
            f"the Ray cluster at {target!r} ({source}) refused this process: it uses token "
            "authentication; set RAY_AUTH_MODE=token with the cluster's token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN (or leave out --address on the head node)"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"cannot connect to the Ray cluster at {target!r} from {source} ({first}); start it "
        "with `ray start --head` or `ray up`, or pass --address local for a private one"
    )


def _find_cluster(address: str | None) -> tuple[str | None, str]:
    """(address to join or None for a private cluster, where the address came from)."""
    if address == "local":
        return None, "--address local"
    if address:
        return address, "--address"
    if os.environ.get("RAY_ADDRESS"):
        value = os.environ["RAY_ADDRESS"]
        return (None, "RAY_ADDRESS=local") if value == "local" else (value, "RAY_ADDRESS")
    from ray._private import services

    # The address of the last `ray start` on this machine, if its processes still run:
    # a stale record (a cluster that died without `ray stop`) must not block a laptop run.
    recorded = services.find_bootstrap_address(None)
    if recorded and recorded in services.find_gcs_addresses():
        return recorded, _FOUND_HERE
    return None, "no running cluster"


IN_PROCESS_LINE = "running in this process (Ray Train local mode): no Ray cluster to start"


def runs_in_process(cfg: TrainConfig) -> bool:
    """Whether the run's one worker runs in this process (`in_process`, see config.py).

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
    target, _ = _find_cluster(cfg.address)
    return target is None


def in_process_use_gpu(use_gpu: str) -> bool:
    import torch

    if use_gpu == "true" and not torch.cuda.is_available():
        raise UserError("use_gpu=true but this machine has no usable CUDA GPU; use --use-gpu auto")
    return torch.cuda.is_available() if use_gpu == "auto" else use_gpu == "true"


def _start_private(dashboard: bool = True, log_to_driver: bool = True) -> None:
    """One logical CPU per core: Train controllers and sweep trial actors reserve
    no CPU, so the cores go to training workers, and more concurrent workers
    than cores would only slow every trial down."""
    with _startup_logs_on_stdout():
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=dashboard,
            dashboard_host=os.environ.get(DASHBOARD_HOST_ENV, "127.0.0.1"),
            log_to_driver=log_to_driver,
        )


def describe_cluster(prefix: str) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    return f"{prefix} {len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU"


class _StdoutLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(f"[ray] {_ANSI.sub('', record.getMessage())}", flush=True)


@contextlib.contextmanager
def _startup_logs_on_stdout() -> Iterator[None]:
    """Print the driver's Ray log lines on stdout (as `[ray] ...`) while `ray.init` runs.

    Ray announces itself on stderr (the token-auth notice, the dashboard URL,
    /dev/shm warnings). On stdout they stay in view, and stderr keeps the CLI
    contract: a run refused after connecting (check_fits) prints one `error:` line.
    """
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.handlers[:]
    ray_logger.handlers = [_StdoutLines()]
    try:
        yield
    finally:
        ray_logger.handlers = saved


def resolve_use_gpu(use_gpu: str) -> bool:
    if use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return use_gpu == "true"


def _bundles_per_node(cpus_per_worker: float, gpus_per_worker: float) -> list[int]:
    """How many worker bundles each live node can hold."""
    need = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    return [
        min(bundles_that_fit(res.get(k, 0), v) for k, v in need.items() if v > 0)
        for res in (n["Resources"] for n in ray.nodes() if n.get("Alive"))
    ]


def bundles_that_fit(available: float, each: float) -> int:
    """How many shares of `each` fit in `available`: 1 // 0.1 is 9.0 in floating point,
    but Ray counts resources in units of 1e-4, so ten 0.1-GPU trials share one GPU."""
    units = 10_000
    return round(available * units) // round(each * units)


def auto_cpus_per_worker(num_workers: int, use_gpu: bool) -> float:
    """CPUs a worker gets when --cpus-per-worker is not given: its node's cores divided by
    the workers that land there (a GPU node hosts one worker per GPU), at least 1.

    Ray sets a worker's OMP_NUM_THREADS to its CPU count, so 1 CPU would mean one torch
    thread on a machine with many idle cores.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if use_gpu:
        shares = [r["CPU"] // r["GPU"] for r in nodes if r.get("GPU")]
        return float(max(1, min(shares, default=1)))
    if not nodes:
        return 1.0
    per_node = -(-num_workers // len(nodes))  # ceil: workers spread over the CPU nodes
    return float(max(1, min(r["CPU"] for r in nodes) // per_node))


def trials_that_fit(workers_per_trial: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Trials whose worker groups the cluster can run at once (at least 1)."""
    return max(1, sum(_bundles_per_node(cpus_per_worker, gpus_per_worker)) // workers_per_trial)


def check_fits(
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    what: str = "this run",
) -> None:
    """Raise UserError unless `num_workers` bundles can be placed on the live cluster."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    per_node = _bundles_per_node(cpus_per_worker, gpus_per_worker)
    total_cpu = sum(res.get("CPU", 0) for res in nodes)
    total_gpu = sum(res.get("GPU", 0) for res in nodes)
    if sum(per_node) >= num_workers:
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


def check_run_dir(
    storage: Storage, run_path: str, resume: bool, overwrite: bool, kind: str = "run"
) -> bool:
    """Refuse to clobber an existing run, or to resume one that does not exist.

    Returns whether the folder exists with content. Writes nothing.
    """
    exists = bool(storage.list_dir(run_path))
    name = run_path.rstrip("/").rsplit("/", 1)[-1]
    where = storage.display()
    if resume and not exists:
        raise UserError(
            f"cannot resume: no {kind} named {name!r} in {where}; check --name and --storage-path"
        )
    if exists and not resume and not overwrite:
        raise UserError(
            f"a {kind} named {name!r} already exists in {where}; "
            "pass --resume to continue it, --overwrite to replace it, or a new --name"
        )
    return exists


def prepare_run_dir(
    storage: Storage, run_path: str, resume: bool, overwrite: bool, kind: str = "run"
) -> None:
    """check_run_dir, then remove the old folder when --overwrite asked for it."""
    if check_run_dir(storage, run_path, resume, overwrite, kind) and overwrite:
        storage.delete_dir(run_path)


# --------------------------------------------------------------------------- pre-Ray checks


def prepare_data(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """Prepare (or reuse) the dataset and check the block size fits it, before Ray starts."""
    dataset_dir, meta = data.prepare_from_config(cfg)
    check_init_from(cfg, meta)
    train_batches = data.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    train_batches.sample_indices(
        0, 0, 0, cfg.micro_batch_size(), cfg.num_workers, cfg.grad_accum_steps()
    )
    data.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)  # raises if val is too short
    return dataset_dir, meta


def check_init_from(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """Pretrained weights or a raygpt checkpoint (init_from) must cover the block size and
    the vocabulary, and a checkpoint must share the data's tokenizer: say so before Ray
    starts, not from inside a worker after the weights loaded (the loop checks again)."""
    trained.check_init_fit(cfg, meta)


def check_resume_compatible(
    storage: Storage, run_path: str, cfg: TrainConfig, vocab_size: int
) -> str | None:
    latest = checkpoint.latest_in_run(run_path, storage)
    if latest is not None:
        checkpoint.check_compatible(checkpoint.load(latest, storage), cfg.to_dict(), vocab_size)
    return latest


# --------------------------------------------------------------------------- the trainer


def build_trainer(
    cfg: TrainConfig,
    name: str,
    storage: Storage,
    use_gpu: bool,
    callbacks: Sequence[Any] = (),
    run_info: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    in_process: bool = False,
    gpus_per_worker: float = 1.0,
):
    """A TorchTrainer running the single training loop with `cfg`, its run folder
    `<storage>/<name>`. `outputs` says where the loop writes what Ray does not
    (TensorBoard); `run_info` is stamped on every step row. `in_process`: Ray
    Train's local mode (`num_workers=0`), the loop runs in this process."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygpt.loop import train_loop_per_worker

    outputs = {"storage": storage, **(outputs or {})}
    if in_process:
        # Ray Train announces local mode at INFO on the console; the run's own line says it.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        outputs |= {
            "in_process": True,
            "run_path": storage.path(name),
            "run_name": name,
            "device": "cuda" if use_gpu else "cpu",
        }
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "train": cfg.to_dict(),
                "run_info": run_info or {},
                "outputs": outputs,
            },
            scaling_config=ScalingConfig(num_workers=0),
            run_config=RunConfig(name=name),
        )
    # Each report waits for the controller's next poll of the workers (Ray's
    # default: every 2 s), so frequent evals of a small model would spend most
    # of their time blocked in ray.train.report. Ray hands this to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "run_info": run_info or {}, "outputs": outputs},
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
            failure_config=FailureConfig(max_failures=cfg.max_failures),
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
        with contextlib.suppress(Exception):  # best-effort unwrapping only
            nested.append(exc.as_instanceof_cause())
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


# --------------------------------------------------------------------------- GPU memory


def gpu_memory_bytes(share: float, timeout_s: float = 60.0) -> int | None:
    """Total memory of a GPU a trial would get, asked of a GPU node (the driver may have
    none); None when no GPU answers in time (the check is then skipped, not guessed)."""

    @ray.remote(num_gpus=share, num_cpus=0)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    ref = total_memory.remote()
    try:
        return int(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None


def check_gpu_memory(cfg: TrainConfig, vocab_size: int, share: float, total: int | None) -> None:
    """Refuse a trial whose estimated peak memory exceeds its share of the GPU.

    Ray does not enforce GPU memory, so four 0.25-GPU trials that each need 30 GiB
    would all start and then die of out-of-memory errors mid-sweep.
    """
    from raygpt.memory_estimate import estimate_training_bytes

    if total is None:
        print("[raygpt] no GPU answered in time; trial memory not checked", flush=True)
        return
    need = estimate_training_bytes(cfg, vocab_size)
    have = share * total
    if need > have:
        raise UserError(
            f"each trial needs about {need / 2**30:.1f} GiB of GPU memory (batch_size="
            f"{cfg.micro_batch_size()} x block_size={cfg.block_size}, {cfg.n_layer}x{cfg.n_embd} "
            f"model, {cfg.optimizer}), but --gpus-per-trial {share:g} of a "
            f"{total / 2**30:.0f} GiB GPU is {have / 2**30:.1f} GiB; raise --gpus-per-trial "
            "or lower --batch-size"
        )
