"""raygpt.train.wiring: RunWiring's defaults, immutability and the pickling Ray relies on."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from raygpt import storage
from raygpt.train.wiring import RunWiring


def test_defaults_describe_a_plain_worker_group_run(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    wiring = RunWiring(storage=store)
    assert wiring.storage is store
    # A worker group gets its folder, name and device from Ray Train, and echoes its lines.
    assert wiring.in_process is False
    assert wiring.tune_session is False
    assert wiring.echo is True
    assert (wiring.run_path, wiring.run_name, wiring.device) == (None, None, None)
    assert (wiring.metadata, wiring.tensorboard_path, wiring.log_path, wiring.hparams) == (
        None,
        None,
        None,
        None,
    )


def test_frozen_and_replace_keeps_other_fields(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    wiring = RunWiring(storage=store, log_path="sweep/logs/t.log", echo=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        wiring.in_process = True  # type: ignore[misc]
    local = dataclasses.replace(wiring, in_process=True, run_path=store.path("run"), device="cpu")
    assert local.in_process and local.device == "cpu"
    assert local.run_path == f"{tmp_path}/run"
    assert (local.log_path, local.echo, local.storage) == ("sweep/logs/t.log", False, store)
    assert wiring.in_process is False  # the original is untouched


def test_pickles_with_its_storage_as_ray_ships_it(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    wiring = RunWiring(
        storage=store,
        metadata={"config": {"optimizer": "adamw"}},
        tensorboard_path=f"{store.root}/tb/trial_1",
        hparams={"learning_rate": 1e-3, "optimizer": "adamw"},
        tune_session=True,
        run_name="trial_1",
    )
    back = pickle.loads(pickle.dumps(wiring))
    assert back == dataclasses.replace(wiring, storage=back.storage)
    assert back.storage.uri == store.uri and back.storage.root == store.root
    # The unpickled filesystem still reaches the same folder.
    back.storage.write_bytes(back.storage.path("probe.txt"), b"hi")
    assert (tmp_path / "probe.txt").read_bytes() == b"hi"
