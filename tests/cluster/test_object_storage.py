"""Results on object storage: a real S3-compatible server (moto's) on 127.0.0.1.

Train, resume, sample and report run against s3:// URIs exactly as on a cluster; the
two-node drill shows DDP ranks and sweep trials on different nodes writing every result
to the bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, step_rows, tiny_config

from raygpt import results, storage
from raygpt.train import driver as train_driver

SHORT = dict(max_steps=12, lr_decay_steps=12, eval_interval=6, warmup_steps=2)


def _env(data_dir) -> dict[str, str]:
    return {**os.environ, "RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def _files(uri: str) -> list[str]:
    """Every object under a URI, relative to it."""
    import pyarrow.fs as pafs

    store = storage.resolve(uri, check=False)
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    return sorted(i.path[len(store.root) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _losses(uri: str) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in step_rows(uri)}


def _run_uri(storage_uri: str, name: str) -> str:
    base, _, query = storage_uri.partition("?")
    return f"{base}/{name}?{query}"


def test_train_resume_sample_and_report_on_s3(ray_cluster, s3_storage, data_dir):
    whole = train_driver.run(tiny_config(s3_storage, name="whole", batch_size=16, **SHORT))
    assert whole["run_dir"].startswith("s3://") and whole["checkpoint"].startswith("s3://")
    files = _files(_run_uri(s3_storage, "whole"))
    assert "run.json" in files
    assert [f for f in files if f.startswith("steps/")] == [
        "steps/part-000000001-000000006.parquet",
        "steps/part-000000007-000000012.parquet",
    ]
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert {"checkpoint_0000006/state.pt", "checkpoint_0000012/state.pt"} <= set(files)

    # Stopped after its step-6 checkpoint, then resumed from the bucket to the end; in this
    # process (Ray Train's local mode), whose checkpoints raygpt uploads itself.
    split = dict(name="split", batch_size=16, in_process="true")
    train_driver.run(tiny_config(s3_storage, **split, **{**SHORT, "max_steps": 6}))
    assert "checkpoint_0000006/state.pt" in _files(_run_uri(s3_storage, "split"))
    train_driver.run(tiny_config(s3_storage, **split, resume=True, **SHORT))
    whole_losses, split_losses = (
        _losses(_run_uri(s3_storage, "whole")),
        _losses(_run_uri(s3_storage, "split")),
    )
    assert sorted(split_losses) == list(range(1, 13))
    for step, loss in whole_losses.items():
        assert split_losses[step] == pytest.approx(loss, abs=1e-6), step

    sample = subprocess.run(
        [sys.executable, "-m", "raygpt.sample", "--checkpoint", "whole",
         "--storage-path", s3_storage, "--num-samples", "1", "--max-new-tokens", "20"],
        cwd=REPO, env=_env(data_dir), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert "checkpoint_0000012" in sample.stderr and len(sample.stdout.strip()) > 0

    report = subprocess.run(
        [sys.executable, "-m", "raygpt.report", _run_uri(s3_storage, "whole")],
        cwd=REPO, env=_env(data_dir), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-2000:]
    assert "adamw" in report.stdout
    assert "loss_curves.png" in _files(_run_uri(s3_storage, "whole"))


@pytest.mark.timeout(700)  # the drill, if this test is the first to need it
def test_two_nodes_ddp_equals_one_node_and_sweep_writes_to_s3(two_node_drill):
    result, s3_storage = two_node_drill.result, two_node_drill.s3_storage
    assert len(set(result["nodes"])) == 2
    # Two ranks on two 1-CPU nodes (SPREAD) == one rank with the same global batch.
    spread, single = (
        _losses(_run_uri(s3_storage, "spread")),
        _losses(_run_uri(s3_storage, "single")),
    )
    assert sorted(spread) == sorted(single) == list(range(1, 13))
    for step in spread:
        assert spread[step] == pytest.approx(single[step], abs=1e-4), step

    # Two concurrent trials, one per node: every result is in the bucket.
    assert result["sweep_status"] == {"completed": 2}
    files = _files(_run_uri(s3_storage, "sweep"))
    assert {"trials.parquet", "sweep.json", "lr_sensitivity.png", "loss_curves.png"} <= set(files)
    store = storage.resolve(_run_uri(s3_storage, "sweep"), check=False)
    trials = results.read_table(store, f"{store.root}/trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["steps"] == 10 for t in trials)
    for trial in trials:
        tid = trial["trial_id"]
        assert any(f.startswith(f"runs/{tid}/steps/part-") for f in files), files
        # One-worker trials checkpoint to Tune, in the trial's own folder of the sweep.
        assert any(f.startswith(f"{tid}/checkpoint_") for f in files), files
        assert f"logs/{tid}.log" in files, files
        assert any(f.startswith(f"tensorboard/{tid}/events.out.tfevents") for f in files)
    rows = step_rows(_run_uri(s3_storage, "sweep"))
    assert len(rows) == 20 and len({(r["trial_id"], r["step"]) for r in rows}) == 20
