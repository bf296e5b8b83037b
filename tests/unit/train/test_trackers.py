"""W&B and MLflow through Ray's integrations, for real: W&B in offline mode (its run file
read back record by record), MLflow on a local file store. One tiny in-process run
(Ray Train's local mode: no cluster) logs to both."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from conftest import TINY_IN_PROCESS as TINY
from conftest import run_main, step_rows, tiny_config

from raygpt.config.train import load_train_config
from raygpt.errors import UserError
from raygpt.train import cli as train_cli
from raygpt.train import driver as train_driver
from raygpt.train import trackers


@pytest.fixture(scope="module")
def tracked(data_dir, tmp_path_factory):
    """One run logging every step row to W&B (offline files) and MLflow (a file store)."""
    root = tmp_path_factory.mktemp("trackers")
    uri = (root / "mlruns").as_uri()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        (root / "results").mkdir()
        cfg = tiny_config(
            root / "results", name="tracked", wandb="raygpt-tests", mlflow=uri, **TINY
        )
        train_driver.run(cfg)
    return root, uri, step_rows(root / "results" / "tracked")


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The history rows of the one offline run under wandb_dir, from its .wandb file: a
    LevelDB-style log (7-byte file header, 32 KiB blocks of CRC/length/type-framed chunks)
    of W&B's protobuf Records. wandb >= 0.19 no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, chunk, history = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # too little room for a chunk: the block's padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pos += header
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # a key is in `key` or, split, in `nested_key`
                history.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return history


def test_wandb_offline_run_holds_every_step_row(tracked):
    root, _, rows = tracked
    history = wandb_history(root)
    assert [h["_step"] for h in history] == [r["step"] for r in rows] == list(range(1, 13))
    for h, r in zip(history, rows, strict=True):
        assert h["train_loss"] == pytest.approx(r["train_loss"])
        assert h["tokens_seen"] == r["tokens_seen"]
    assert [h["_step"] for h in history if "val_loss" in h] == [6, 12]


def test_mlflow_file_store_holds_the_metric_history(tracked):
    import mlflow

    _, uri, rows = tracked
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(trackers.DEFAULT_MLFLOW_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["optimizer"] == "adamw" and run.data.params["n_embd"] == "32"
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 13))
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in rows])
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [6, 12]


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_missing_tracker_package_is_one_line_before_ray(tmp_path, package, capfd, monkeypatch):
    # The package made unimportable, as if it were not installed: find_spec finds None.
    monkeypatch.setitem(sys.modules, package, None)
    flag = ["--wandb", "p"] if package == "wandb" else ["--mlflow", str(tmp_path / "mlruns")]
    args = ["--storage-path", str(tmp_path / "results"), "--name", "r", *flag]
    env = {"RAYGPT_DATA_DIR": str(tmp_path / "data")}
    result = run_main(train_cli.main, *args, capfd=capfd, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --{package} needs the {package} package: pip install 'raygpt[{package}]'"
    ]
    # Before anything else: no data prepared, no run folder.
    assert not (tmp_path / "results" / "r").exists() and not (tmp_path / "data").exists()


def test_tracker_flags_are_checked(tmp_path):
    with pytest.raises(UserError, match="not a W&B project name"):
        load_train_config(None, {"wandb": "team/project"})
    cfg = load_train_config(None, {"mlflow": str(tmp_path / "mlruns")})
    assert cfg.mlflow == (tmp_path / "mlruns").as_uri()  # a folder: the file store, absolute
    assert load_train_config(None, {"mlflow": "http://mlflow:5000"}).mlflow == "http://mlflow:5000"


def test_tune_callbacks_for_a_sweep(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    assert trackers.tune_callbacks(load_train_config(None, {}), "s") == []
    cfg = load_train_config(None, {"wandb": "proj", "mlflow": str(tmp_path / "mlruns")})
    wandb_cb, mlflow_cb = trackers.tune_callbacks(cfg, "my-sweep")
    assert isinstance(wandb_cb, WandbLoggerCallback)
    assert (wandb_cb.project, wandb_cb.group) == ("proj", "my-sweep")
    assert isinstance(mlflow_cb, MLflowLoggerCallback)
    assert mlflow_cb.tracking_uri == cfg.mlflow and mlflow_cb.experiment_name == "my-sweep"


def test_sweep_trials_leave_logging_to_the_driver():
    cfg = load_train_config(None, {"wandb": "proj"})
    assert trackers.RunTrackers.open(cfg, "t", {"trial_id": "abc"}) is None
    assert trackers.RunTrackers.open(load_train_config(None, {}), "t", {}) is None
