"""What fits on the cluster: worker bundles per node, CPUs per worker, GPU memory per trial.

Ray Train retries a worker group that cannot be placed forever, so an impossible request
would hang instead of failing: these checks run before any worker group starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from raygpt.config.train import TrainConfig
from raygpt.errors import UserError


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


def _free() -> tuple[float, float]:
    free = ray.available_resources()
    return free.get("CPU", 0.0), free.get("GPU", 0.0)


def _asked(num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> str:
    gpu = f" + {gpus_per_worker:g} GPU" if gpus_per_worker else ""
    return f"{num_workers} worker(s) x {cpus_per_worker:g} CPU{gpu}"


def announce_wait(
    num_workers: int, cpus_per_worker: float, gpus_per_worker: float, start_timeout_s: float
) -> None:
    """Say so before a run waits for resources that other work holds: Ray Train's own
    warning comes only after a minute, and blames autoscaling."""
    cpu, gpu = _free()
    if cpu >= num_workers * cpus_per_worker and gpu >= num_workers * gpus_per_worker:
        return
    limit = "as long as it takes" if start_timeout_s == 0 else f"up to {start_timeout_s:g} s"
    print(
        f"[raygpt] waiting for {_asked(num_workers, cpus_per_worker, gpus_per_worker)}: "
        f"the cluster has {cpu:g} CPU and {gpu:g} GPU free now (`ray status` shows what "
        f"holds the rest); the run waits {limit} for them (--start-timeout-s)",
        flush=True,
    )


def is_start_timeout(err: BaseException) -> bool:
    """Whether `err` (a failed fit) is Ray Train giving up on placing the worker group."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, WorkerGroupStartupTimeoutError):
            return True
        err = getattr(err, "controller_failure", None) or err.__cause__ or err.__context__
    return False


def start_timeout_error(
    num_workers: int, cpus_per_worker: float, gpus_per_worker: float, start_timeout_s: float
) -> UserError:
    cpu, gpu = _free()
    return UserError(
        f"the worker group ({_asked(num_workers, cpus_per_worker, gpus_per_worker)}) could "
        "not start "
        f"within {start_timeout_s:g} s: the cluster has {cpu:g} CPU and {gpu:g} GPU free; "
        "stop what holds them (`ray status`), lower --num-workers/--cpus-per-worker, or "
        "raise --start-timeout-s (0: wait forever)"
    )


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


def check_gpu_memory(
    cfg: TrainConfig,
    vocab_size: int,
    share: float,
    total: int | None,
    dims: Sequence[Any] = (),
    optimizers: Sequence[str] = (),
) -> None:
    """Refuse a sweep whose hungriest trial's estimated peak memory exceeds its share of
    the GPU: the worst point of the searched `dims` and `optimizers`
    (memory_estimate.worst_case), not the base config.

    Ray does not enforce GPU memory, so four 0.25-GPU trials that each need 30 GiB
    would all start and then die of out-of-memory errors mid-sweep.
    """
    from raygpt.cluster.memory_estimate import worst_case

    if total is None:
        print("[raygpt] no GPU answered in time; trial memory not checked", flush=True)
        return
    need, worst, point = worst_case(cfg, vocab_size, dims, optimizers)
    have = share * total
    if need <= have:
        return
    searched = [key for key in point if key != "optimizer"]
    if len(optimizers) > 1:
        searched.append("optimizer")
    # The micro-batch itself, unless the search moves it (then its largest bound).
    moved = any(key in point for key in ("batch_size", "tokens_per_step", "block_size"))
    batch = worst.batch_size if moved else worst.micro_batch_size()
    shape = (
        f"batch_size={batch} x block_size={worst.block_size}, {worst.n_layer}x{worst.n_embd} "
        f"model, {worst.optimizer}, dtype {worst.dtype}"
    )
    if searched:
        named = ", ".join(f"{key}={point[key]}" for key in searched)
        who = f"the search space's largest trial ({named})"
        sizes = [key for key in searched if key != "optimizer"]
        fix = (
            f"or search smaller values of {', '.join(sizes)}"
            if sizes
            else f"or leave {worst.optimizer} out of --optimizers"
        )
    else:
        who, fix = "each trial", "or lower --batch-size"
    raise UserError(
        f"{who} needs about {need / 2**30:.1f} GiB of GPU memory ({shape}), but "
        f"--gpus-per-trial {share:g} of a {total / 2**30:.0f} GiB GPU is {have / 2**30:.1f} "
        f"GiB; raise --gpus-per-trial {fix}"
    )
