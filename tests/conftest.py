"""Shared fixtures: one real local Ray cluster and one prepared corpus per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3server import s3_auth_endpoint, s3_endpoint, s3_storage  # noqa: F401

REPO = Path(__file__).resolve().parent.parent

# Fixtures that tests in several folders share, each module beside this one.
pytest_plugins = ["bad_input_cases", "benchmark_runs", "builders", "mlflow_server", "postgres"]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    _SESSION["config"] = config


_SESSION: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """An xdist worker leaves as soon as its results are sent: the interpreter's teardown,
    freeing a heap of torch, pyarrow and the servers' clients, takes seconds that the
    session waits for and checks nothing. Python's exit handlers (Ray's shutdown, temporary
    folders, child processes) still run first; only that teardown is skipped."""
    if not hasattr(config, "workerinput"):
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pytest_runtest_logreport(report):
    """A failure's traceback the moment it happens, not only in the end's summary: a run
    that a later hang ends (the timeout's thread method) still shows why it failed."""
    config = _SESSION.get("config")
    if not report.failed or config is None:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    tail = "\n".join(report.longreprtext.splitlines()[-60:])
    reporter.write_line(f"\n--- {report.nodeid} failed in {report.when}:\n{tail}")


def pytest_collection_modifyitems(items):
    """tests/unit/ first: its minutes of Ray-free checks fail fast, and nothing of a
    cluster runs beside them. Then the tests that start clusters of their own, and last
    those on the session's cluster, so its idle daemons never share the cores with
    another cluster's work."""
    # By module, so that a module's tests stay together and its fixtures are built once.
    on_session_cluster = {item.path for item in items if "ray_cluster" in item.fixturenames}
    items.sort(key=lambda item: ("tests/unit/" not in item.nodeid, item.path in on_session_cluster))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A session cache of prepared datasets (pydocs_char is built once, ~5 s)."""
    path = tmp_path_factory.mktemp("data")
    os.environ["RAYGPT_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(data_dir):
    """A private local Ray cluster (never one already running on the machine)."""
    import ray

    from raygpt.cluster import connect

    connect.connect("local")
    yield ray
    ray.shutdown()


@pytest.fixture
def storage(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


# A 12-step run in this process (no Ray cluster): the cheapest real raygpt.train run.
TINY_IN_PROCESS = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=4,
    max_steps=12,
    lr_decay_steps=12,
    warmup_steps=2,
    eval_interval=6,
    eval_iters=2,
    log_interval=6,
    in_process="true",
)


def tiny_config(storage: Path, **overrides):
    """A model small enough that a Ray run takes seconds on 2 cores."""
    from raygpt.config.train import TrainConfig

    values = dict(
        storage_path=str(storage),
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=8,
        max_steps=20,
        warmup_steps=5,
        eval_interval=10,
        eval_iters=4,
        log_interval=10,
        learning_rate=3e-3,
        compile="false",
        # A worker group that cannot be placed fails the test in a minute, with the line
        # that says why, well inside the suite's per-test timeout.
        start_timeout_s=60,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def step_rows(folder: Path | str) -> list[dict]:
    """Every step row of a run or sweep folder (its Parquet parts), one per (trial, step)."""
    from raygpt import results, storage

    table, _ = results.read_steps(storage.resolve(str(folder), check=False), _root(folder))
    return table.to_pylist() if table is not None else []


def step_metadata(folder: Path | str) -> dict:
    from raygpt import results, storage

    return results.read_steps(storage.resolve(str(folder), check=False), _root(folder))[1]


def _root(folder: Path | str) -> str:
    from raygpt import storage

    return storage.resolve(str(folder), check=False).root


def write_trials_parquet(folder: Path, rows: list[dict], metadata: dict) -> Path:
    """`folder`/trials.parquet in raygpt's own format: the rows under TRIAL_SCHEMA and the
    sweep's records in the footer, as raygpt.sweep writes it."""
    import pyarrow as pa

    from raygpt import results, storage

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=results.TRIAL_SCHEMA)
    store = storage.resolve(str(folder), check=False)
    results.write_table(
        store, f"{store.root}/{results.TRIALS_FILE}", results.with_metadata(table, metadata)
    )
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line(err: pytest.ExceptionInfo) -> str:
    """A raised error's text, which must be one line."""
    text = str(err.value)
    assert "\n" not in text
    return text


# A two-trial grid sweep of a model that trains in seconds.
TINY_SWEEP = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "10", "--eval-interval", "5", "--eval-iters", "1",
    "--warmup-steps", "1", "--log-interval", "10", "--compile", "false",
    "--optimizers", "adamw", "--search", "grid", "--grid-points", "2",
    "--scheduler", "fifo", "--max-concurrent-trials", "1",
]  # fmt: skip


def one_error_line(capsys) -> str:
    """The one `error:` line a CLI's main printed on stderr."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def run_module(module: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(main, *args, capfd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A CLI's `main(ARGS)` in this process, under `env` if given: its exit code and what it
    printed, as `run_module` gives them. A second interpreter importing torch costs seconds,
    so a command's process is left to the tests of the command as a user types it."""
    argv = list(map(str, args))
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        code = main(argv)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def one_thread():
    """One torch thread: bitwise comparisons, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
