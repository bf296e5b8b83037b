"""raygpt.train.trainer: when a run trains in this process, and the TorchTrainer it builds
(scaling, run config, forwarded environment, the loop's wiring), without calling fit or
starting Ray."""

from __future__ import annotations

import os

import pytest
import ray
import ray.train
import torch
from conftest import one_line

from raygpt import storage
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.train import trainer
from raygpt.train.loop import train_loop_per_worker
from raygpt.train.wiring import RunWiring


class _Callback(ray.train.UserCallback):
    """A user callback of Ray Train's own kind (Tune's needs a Tune session)."""


def _cfg(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**({"storage_path": str(tmp_path)} | overrides)).validate()


@pytest.fixture(autouse=True)
def _no_ray():
    # Everything here must work without a Ray session, and leave none behind.
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized()


def test_runs_in_process(tmp_path):
    assert trainer.runs_in_process(_cfg(tmp_path, in_process="true")) is True
    assert trainer.runs_in_process(_cfg(tmp_path, in_process="false")) is False
    # auto: only one worker with no cluster to join ("local" names none).
    assert trainer.runs_in_process(_cfg(tmp_path, address="local")) is True
    assert trainer.runs_in_process(_cfg(tmp_path, address="127.0.0.1:6379")) is False
    assert trainer.runs_in_process(_cfg(tmp_path, num_workers=2, address="local")) is False
    with pytest.raises(UserError) as err:
        trainer.runs_in_process(_cfg(tmp_path, in_process="true", num_workers=2))
    assert "num_workers=2" in one_line(err) and "--num-workers 1" in one_line(err)


def test_in_process_use_gpu():
    assert trainer.in_process_use_gpu("false") is False
    assert trainer.in_process_use_gpu("auto") is torch.cuda.is_available()
    if torch.cuda.is_available():
        assert trainer.in_process_use_gpu("true") is True
    else:
        with pytest.raises(UserError, match="no usable CUDA GPU; use --use-gpu auto"):
            trainer.in_process_use_gpu("true")


def test_worker_group_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_DATA_DIR", "/data/cache")
    monkeypatch.setenv("RAYGPT_UNIT_TEST_FLAG", "1")
    monkeypatch.setenv("NOT_RAYGPT_FLAG", "1")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv(trainer.START_TIMEOUT_ENV, raising=False)
    store = storage.resolve(str(tmp_path), check=False)
    cfg = _cfg(
        tmp_path,
        start_timeout_s=150,
        num_workers=2,
        cpus_per_worker=1.5,
        keep_checkpoints=3,
        max_failures=4,
        placement_strategy="SPREAD",
    )
    other = storage.resolve(str(tmp_path / "elsewhere"), check=False)
    callback = _Callback()
    built = trainer.build_trainer(
        cfg,
        name="run1",
        storage=store,
        use_gpu=True,
        gpus_per_worker=0.5,
        callbacks=[callback],
        run_info={"trial_id": "t1"},
        wiring=RunWiring(storage=other, log_path="x.log"),
    )
    assert not built.running_in_local_mode
    scaling = built.scaling_config
    assert (scaling.num_workers, scaling.use_gpu) == (2, True)
    assert scaling.resources_per_worker == {"CPU": 1.5, "GPU": 0.5}
    assert scaling.placement_strategy == "SPREAD"
    run = built.run_config
    assert run.name == "run1"
    assert run.storage_path == store.root and run.storage_filesystem is store.fs
    assert run.checkpoint_config.num_to_keep == 3
    assert run.failure_config.max_failures == 4
    # 150 s to place the workers: three 60 s start attempts, the first and two retries.
    assert run.failure_config.controller_failure_limit == 2
    assert os.environ[trainer.START_TIMEOUT_ENV] == "60"
    assert run.callbacks == [callback]
    # The RAYGPT_* settings travel to the workers; nothing else of this environment does.
    assert run.worker_runtime_env == {
        "env_vars": {
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            "RAYGPT_DATA_DIR": "/data/cache",
            "RAYGPT_UNIT_TEST_FLAG": "1",
        }
    }
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == trainer.CONTROLLER_POLL_S
    loop_config = built.train_loop_config
    assert built.train_loop_per_worker is train_loop_per_worker
    assert loop_config["train"] == cfg.to_dict()
    assert loop_config["run_info"] == {"trial_id": "t1"}
    # The wiring's storage is the one given, whatever the wiring said; the rest is kept.
    assert loop_config["wiring"] == RunWiring(storage=store, log_path="x.log")


def test_a_cpu_worker_group_asks_for_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    store = storage.resolve(str(tmp_path), check=False)
    built = trainer.build_trainer(_cfg(tmp_path, cpus_per_worker=2.0), "r", store, use_gpu=False)
    assert built.scaling_config.resources_per_worker == {"CPU": 2.0}
    assert built.scaling_config.use_gpu is False
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"  # a user's own setting stays
    assert built.train_loop_config["run_info"] == {}
    assert built.train_loop_config["wiring"] == RunWiring(storage=store)


def test_in_process_trainer_is_local_mode_with_the_run_folder_wired(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    built = trainer.build_trainer(
        _cfg(tmp_path),
        "local_run",
        store,
        use_gpu=False,
        wiring=RunWiring(storage=store, metadata={"config": {}}),
        in_process=True,
    )
    assert built.running_in_local_mode and built.scaling_config.num_workers == 0
    assert built.run_config.name == "local_run"
    wiring = built.train_loop_config["wiring"]
    assert wiring == RunWiring(
        storage=store,
        metadata={"config": {}},
        in_process=True,
        run_path=f"{tmp_path}/local_run",
        run_name="local_run",
        device="cpu",
    )
    gpu = trainer.build_trainer(_cfg(tmp_path), "g", store, use_gpu=True, in_process=True)
    assert gpu.train_loop_config["wiring"].device == "cuda"


def test_raygpt_env(monkeypatch):
    monkeypatch.setenv("RAYGPT_FAIL_AT", "0:3")
    monkeypatch.setenv("XRAYGPT_OTHER", "1")
    env = trainer.raygpt_env()
    assert env["RAYGPT_FAIL_AT"] == "0:3"
    assert all(k.startswith("RAYGPT_") for k in env)
    assert "XRAYGPT_OTHER" not in env


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(600, (60.0, 9)), (150, (60.0, 2)), (60, (60.0, 0)), (5, (5.0, 0)), (0, (60.0, -1))],
)
def test_start_retries_bound_the_wait_for_resources(timeout, expected):
    assert trainer.start_retries(timeout) == expected
