"""The sweep on a real local Ray cluster: ASHA, divergence, Parquet, TensorBoard, report."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import step_rows

from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--max-steps", "40", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "40", "--compile", "false",
]  # fmt: skip


def test_grid_sweep_asha_stops_frees_and_records_divergence(ray_cluster, storage):
    args = [
        *TINY,
        "--optimizers", "adamw,sgd,momentum",
        "--search", "grid", "--grid-points", "2",
        # adamw learns, sgd at 1e-5 barely moves (ASHA stops it), momentum at 500 blows up
        "--lr-range", "adamw=3e-3:6e-3", "--lr-range", "sgd=1e-5:2e-5",
        "--lr-range", "momentum=300:500",
        "--grace-steps", "10", "--reduction-factor", "2",
        "--max-concurrent-trials", "2",
        # Room after the first rung: ASHA's stop reaches a trial asynchronously, and a tiny
        # model could otherwise finish 40 steps before it lands (seen once in CI).
        "--max-steps", "100",
        "--name", "grid", "--storage-path", str(storage),
    ]  # fmt: skip
    sweep_driver.run(*sweep_cli.configs_from_argv(args))
    sweep_dir = storage / "grid"

    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert len(trials) == 6
    status = {t["trial_id"]: t["status"] for t in trials}
    by_opt = {}
    for t in trials:
        by_opt.setdefault(t["optimizer"], []).append(t)
    assert any(t["status"] == "completed" and t["steps"] == 100 for t in by_opt["adamw"]), status
    assert all(t["status"] == "diverged" for t in by_opt["momentum"]), status
    assert any(t["status"] == "stopped_early" for t in by_opt["sgd"]), status
    # Every trial ran, so the slots of stopped and diverged trials were given back.
    assert all(t["status"] != "running" and t["steps"] > 0 for t in trials)
    assert all(t["momentum"] is None for t in trials if t["optimizer"] != "momentum")
    # Compute accounting: each trial's model as it reported itself, its FLOPs and device time.
    assert all((t["n_layer"], t["n_embd"], t["parametrization"]) == (1, 32, "sp") for t in trials)
    assert all(t["n_params"] > 0 and t["flops"] > 0 and t["device_seconds"] > 0 for t in trials)
    assert all(t["gpu_hours"] is not None for t in trials)

    steps = step_rows(sweep_dir)
    assert len(steps) == sum(t["steps"] for t in trials)
    keys = [(r["trial_id"], r["step"]) for r in steps]
    assert len(set(keys)) == len(keys)
    assert set(steps[0]) >= {"trial_id", "step", "train_loss", "val_loss", "lr",
                             "grad_norm", "tokens_per_sec", "mfu"}  # fmt: skip
    meta = pq.read_schema(sweep_dir / "trials.parquet").metadata
    assert b"raygpt.environment" in meta and b"raygpt.sweep" in meta

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best = min(by_opt["adamw"], key=lambda t: t["best_val_loss"])
    acc = EventAccumulator(str(sweep_dir / "tensorboard" / best["trial_id"]))
    acc.Reload()
    assert {"loss/train", "loss/val", "optim/lr", "optim/grad_norm", "perf/tokens_per_sec"} <= set(
        acc.Tags()["scalars"]
    )
    assert len(acc.Scalars("loss/train")) == 100
    assert (sweep_dir / "lr_sensitivity.png").stat().st_size > 10_000

    (sweep_dir / "lr_sensitivity.png").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.report", str(sweep_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "adamw" in out.stdout and f"{best['learning_rate']:.3g}" in out.stdout
    assert (sweep_dir / "lr_sensitivity.png").exists()

    # TensorBoard's HParams tab, read from the real server's HTTP API: one session per
    # trial with what the search chose, and each trial's last val loss as a metric.
    groups = _hparams_session_groups(sweep_dir, len(trials))
    sessions = {g["name"].rsplit("/", 1)[-1]: g for g in groups}
    assert set(sessions) == set(status)
    for t in trials:
        group = sessions[t["trial_id"]]
        assert group["hparams"]["optimizer"] == t["optimizer"]
        assert group["hparams"]["learning_rate"] == pytest.approx(t["learning_rate"])
        assert ("momentum" in group["hparams"]) == (t["optimizer"] == "momentum")
        metrics = {m["name"]["tag"]: m for m in group["metricValues"]}
        assert metrics["loss/val"]["trainingStep"] == t["steps"]
        if t["status"] != "diverged":
            assert metrics["loss/val_best"]["value"] == pytest.approx(t["best_val_loss"], rel=1e-5)


def _hparams_session_groups(logdir, expected: int) -> list[dict]:
    """The HParams plugin's session groups, as `tensorboard --logdir` serves them, once it
    has loaded `expected` of them (or after a minute)."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    body = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [],
        "startIndex": 0,
        "sliceSize": 1000,
    }
    try:
        deadline = time.time() + 60
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    groups = json.loads(response.read())["sessionGroups"]
                if len(groups) >= expected or time.time() > deadline:
                    return groups
            except OSError:  # not listening yet
                assert time.time() < deadline and server.poll() is None, "tensorboard did not start"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
