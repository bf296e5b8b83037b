"""Joining a Ray cluster the way `ray.init()` does, or starting a private one, and saying which."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from raygpt.errors import ANSI, UserError, first_line

DASHBOARD_HOST_ENV = "RAYGPT_DASHBOARD_HOST"


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
    target, source = find_cluster(address)
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
    first = first_line(err)
    return (
        f"cannot connect to the Ray cluster at {target!r} from {source} ({first}); start it "
        "with `ray start --head` or `ray up`, or pass --address local for a private one"
    )


def find_cluster(address: str | None) -> tuple[str | None, str]:
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
        print(f"[ray] {ANSI.sub('', record.getMessage())}", flush=True)


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
