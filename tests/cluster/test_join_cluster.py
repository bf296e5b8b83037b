"""A Ray head started by hand (`ray start --head` on 127.0.0.1), as `ray up` leaves one.

raygpt must join it by default, run as a `ray job submit` job, and refuse, in
seconds and with one line naming the node, a storage path that one node cannot
see. That node is a real second raylet whose mount namespace hides the
storage folder behind a private tmpfs: the same path, another disk.

This module owns the only Ray cluster while it runs: the head is started for
it and killed after it (test files run in name order, before the session's
private cluster of the other Ray tests starts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, step_rows

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--max-steps", "20", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "100", "--compile", "false",
]  # fmt: skip
RAY = str(Path(sys.executable).with_name("ray"))


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def _kill(proc: subprocess.Popen) -> None:
    # SIGKILL to the whole group (ray start and the raylet, GCS... it started): SIGTERM
    # would make the node drain for 30 s first.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


RECORD = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def _recorded_address() -> str:
    return RECORD.read_text().strip() if RECORD.exists() else ""


def _wait_for_nodes(port: int, count: int, env: dict[str, str], timeout: float = 120) -> str:
    """Wait until the head on `port` has `count` live nodes; return its recorded address
    (Ray records the head under this machine's address, not 127.0.0.1)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.time() + timeout
    detail = "no address recorded"
    while time.time() < deadline:
        address = _recorded_address()
        if address.endswith(f":{port}"):
            try:
                out = subprocess.run(
                    [sys.executable, "-c", probe, address],
                    env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                    timeout=30,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                detail = "the probe timed out"
            else:
                if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                    return address
                detail = (out.stdout + out.stderr)[-500:]
        time.sleep(1)
    raise RuntimeError(f"the cluster on port {port} did not reach {count} node(s): {detail}")


@pytest.fixture(scope="module")
def head(data_dir, tmp_path_factory):
    """`ray start --head --block`; yields (gcs address, dashboard URL on 127.0.0.1, env)."""
    env = _env(data_dir)
    port, dashboard = free_port(), free_port()
    log = (tmp_path_factory.mktemp("head") / "head.log").open("w")
    proc = subprocess.Popen(
        [
            RAY, "start", "--head", "--block",
            f"--port={port}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
            # Ports of their own: the suite's private cluster (ray_cluster) may still run,
            # and its dashboard agent holds the default 52365; the job server would then
            # ask that cluster's agent, which refuses ("No available agent").
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        address = _wait_for_nodes(port, 1, env)
        yield address, f"http://127.0.0.1:{dashboard}", env
    finally:
        _kill(proc)
        # Killed, the head leaves `ray start`'s record of its address behind, and Ray's
        # own `ray.init()` in a later test would wait on that dead address until it timed out.
        if _recorded_address().endswith(f":{port}"):
            RECORD.unlink(missing_ok=True)


def test_train_joins_the_running_cluster_by_default(head, tmp_path):
    address, _, env = head
    storage = tmp_path / "results"
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.train", *TINY, "--name", "joined",
         "--storage-path", str(storage)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert f"joined the Ray cluster at {address}" in out.stdout, out.stdout[-2000:]
    assert "1 node(s), 2 CPU, 0 GPU" in out.stdout
    assert [r["step"] for r in step_rows(storage / "joined")] == list(range(1, 21))


def test_ray_job_submit_runs_train_and_sweep(head, tmp_path):
    _, dashboard, env = head
    storage = tmp_path / "results"

    def submit(*command: str) -> subprocess.CompletedProcess:
        # The head's job agent registers a little after the node does; Ray then answers
        # "No available agent to submit job, please try again later", as it says.
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(
                [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
                 "--", *command],
                cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                text=True, timeout=400,
            )  # fmt: skip
            if "No available agent" not in out.stderr or time.monotonic() > deadline:
                return out
            time.sleep(2)

    run = submit(
        sys.executable, "-m", "raygpt.train", *TINY, "--name", "job", "--storage-path", str(storage)
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert "joined the Ray cluster" in run.stdout
    assert "succeeded" in run.stdout
    assert [r["step"] for r in step_rows(storage / "job")] == list(range(1, 21))
    assert json.loads((storage / "job" / "run.json").read_text())["cluster"]

    # A sweep whose every trial fails is a failed job, and says why each trial failed.
    failing = submit(
        "env", "RAYGPT_FAIL_AT=0:3:raise", sys.executable, "-m", "raygpt.sweep", *TINY,
        "--optimizers", "adamw", "--search", "grid", "--grid-points", "2", "--scheduler", "fifo",
        "--max-failures", "0", "--name", "all-fail", "--storage-path", str(storage),
    )  # fmt: skip
    text = failing.stdout + failing.stderr
    assert failing.returncode != 0, text[-3000:]
    assert "no trial finished (2 error)" in text, text[-3000:]
    error_lines = [line for line in text.splitlines() if ": error at step" in line]
    assert len(error_lines) == 2, text[-3000:]
    assert all("injected fault at step 3" in line for line in error_lines), error_lines


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_node_that_cannot_see_the_storage_path_fails_in_seconds(head, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a private tmpfs for the second node needs root")
    address, _, env = head
    storage = tmp_path / "results"
    storage.mkdir()
    (storage / "earlier-run").mkdir()
    (storage / "earlier-run" / "run.json").write_text("{}")
    before = sorted(str(p.relative_to(storage)) for p in storage.rglob("*"))
    # A second node whose view of `storage` is its own empty tmpfs: a node-local path.
    script = f"mount -t tmpfs raygpt-node-local {storage} && exec {RAY} start --block " \
             f"--address={address} --num-cpus=1"  # fmt: skip
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**env, "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_nodes(int(address.rsplit(":", 1)[1]), 2, env)
        started = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "raygpt.train", *TINY, "--name", "split-brain",
             "--storage-path", str(storage), "--address", address],
            cwd=REPO, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        elapsed = time.time() - started
    finally:
        _kill(node)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: node "), out.stderr
    assert str(storage) in lines[0] and "shared" in lines[0]
    assert elapsed < 60, elapsed
    assert sorted(str(p.relative_to(storage)) for p in storage.rglob("*")) == before
