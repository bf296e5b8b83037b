"""Surviving what clusters do: a killed driver, a failing trial, a lost node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, step_rows

from raygpt import results, storage
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.train.faults import FAIL_AT_ENV

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "100", "--compile", "false",
]  # fmt: skip


# The killed-driver sweep: an adamw trial, then an sgd trial that stalls after its
# checkpoint at step 30 (and only in its first attempt), so the driver is surely killed
# while that trial is mid-run with a checkpoint to resume from.
KILLED_STEPS = 100
STALL_AT = "0:35:stall:sgd"


def _env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def _trials(sweep: str) -> list[dict]:
    """trials.parquet of a sweep folder (a path or URI), [] until it exists."""
    store = storage.resolve(sweep, check=False)
    table = results.read_table(store, f"{store.root}/trials.parquet")
    return table.to_pylist() if table is not None else []


def _under(uri: str, *parts: str) -> str:
    base, _, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")


@pytest.mark.timeout(600)
def test_killed_sweep_driver_resumes_without_loss_or_duplicates(
    ray_cluster, data_dir, tmp_path, s3_storage
):
    # On object storage (a real S3-compatible server): trials.parquet, step parts and
    # checkpoints all live in the bucket, and the restored sweep reads them back from it.
    # Both drivers join the session's cluster, which outlives the killed one as a shared
    # cluster does.
    args = [
        sys.executable, "-m", "raygpt.sweep", *TINY, "--max-steps", str(KILLED_STEPS),
        "--optimizers", "adamw,sgd", "--search", "grid", "--grid-points", "1",
        "--scheduler", "fifo",
        "--max-concurrent-trials", "1", "--name", "killed", "--storage-path", s3_storage,
        "--address", ray_cluster.get_runtime_context().gcs_address,
    ]  # fmt: skip
    sweep_uri = _under(s3_storage, "killed")
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        args, cwd=REPO, env={**_env(data_dir), FAIL_AT_ENV: STALL_AT}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    # Kill the driver once one trial is complete and the next has checkpointed.
    deadline = time.time() + 240
    victim = None
    while time.time() < deadline and driver.poll() is None:
        trials = _trials(sweep_uri)
        done = [t for t in trials if t["status"] == "completed"]
        running = [t for t in trials if t["status"] == "running"]
        # A one-worker trial checkpoints to Tune, which names the latest in the table.
        if done and running and running[0]["checkpoint_path"] and running[0]["steps"] >= 30:
            victim = running[0]["trial_id"]
            break
        time.sleep(0.5)
    assert victim is not None, (tmp_path / "first.log").read_text()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    completed_before = {t["trial_id"] for t in _trials(sweep_uri) if t["status"] == "completed"}
    steps_before = step_rows(sweep_uri)
    time.sleep(2)  # let the cluster release the killed driver's trials

    resumed = subprocess.run(
        [*args, "--resume"], cwd=REPO, env=_env(data_dir), capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    # The victim's resumed attempt has its own log on the bucket, which says where it
    # resumed (the first attempt's process may outlive the kill and keep saving its own).
    logs = storage.resolve(_under(sweep_uri, "logs"), check=False)
    names = [n for n in logs.list_dir(logs.root) if n.startswith(f"{victim}.")]
    assert f"{victim}.log" in names and f"{victim}.1.log" in names, names
    text = logs.read_bytes(f"{logs.root}/{victim}.1.log").decode()
    assert "resumed from step" in text, text[-2000:]
    # The console holds the live view, not Ray Train's per-report INFO lines.
    assert "Reporting training result" not in resumed.stdout + resumed.stderr
    assert "[sweep]" in resumed.stdout and "trials 2:" in resumed.stdout

    trials = _trials(sweep_uri)
    assert len(trials) == 2 and len({t["trial_id"] for t in trials}) == 2
    assert all(t["status"] == "completed" and t["steps"] == KILLED_STEPS for t in trials), trials
    steps = step_rows(sweep_uri)
    keys = [(r["trial_id"], r["step"]) for r in steps]
    assert len(keys) == len(set(keys)) == 2 * KILLED_STEPS
    # Trials finished before the kill were not run again: their rows are untouched.
    for trial_id in completed_before:
        before = [r for r in steps_before if r["trial_id"] == trial_id]
        after = [r for r in steps if r["trial_id"] == trial_id]
        assert before == after


def test_failing_trial_is_recorded_and_the_sweep_goes_on(ray_cluster, storage, monkeypatch):
    # Every sgd trial raises at step 3 (a bad batch, say); adamw trials are fine.
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "0:3:raise:sgd")
    args = [
        *TINY, "--max-steps", "20", "--optimizers", "adamw,sgd", "--search", "grid",
        "--grid-points", "1", "--scheduler", "fifo", "--max-failures", "0",
        "--max-trial-failures", "1", "--name", "errors", "--storage-path", str(storage),
    ]  # fmt: skip
    sweep_driver.run(*sweep_cli.configs_from_argv(args))
    trials = {t["optimizer"]: t for t in _trials(str(storage / "errors"))}
    assert trials["adamw"]["status"] == "completed" and trials["adamw"]["steps"] == 20
    assert trials["sgd"]["status"] == "error"
    assert "injected fault at step 3" in trials["sgd"]["error"]


@pytest.mark.timeout(700)  # the drill, if this test is the first to need it
def test_lost_node_resumes_on_the_remaining_node(two_node_drill):
    result = two_node_drill.result["node_loss"]
    assert result["removed_node"], two_node_drill.output[-2000:]
    assert result["summary"]["step"] == 200
    assert "resumed from step" in two_node_drill.output
    rows = step_rows(two_node_drill.local_dir / "node-loss")
    assert [r["step"] for r in rows] == list(range(1, 201))
