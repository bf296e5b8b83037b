"""trials.parquet as the sweep driver's Tune callback writes it."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
from builders import TuneTrial

from raygpt import storage
from raygpt.sweep.trials_table import SweepOutputs


def test_a_result_held_back_by_the_throttle_is_written_on_the_next_step_end(tmp_path, monkeypatch):
    monkeypatch.setattr(SweepOutputs, "WRITE_EVERY_S", 0.2)
    store = storage.resolve(str(tmp_path), check=False)
    outputs = SweepOutputs(store, store.path("s"), {"config": {}}, 20, 1337, announce=False)
    trial = TuneTrial("t1", {"optimizer": "adamw", "learning_rate": 1e-3})
    outputs.on_trial_start(0, [trial], trial)  # a forced write
    result = {"step": 10, "val_loss": 2.5, "checkpoint_path": "/ckpt/10"}
    outputs.on_trial_result(1, [trial], trial, result)  # inside the throttle: held back

    def row() -> dict:
        (only,) = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()
        return only

    assert row()["steps"] == 0 and row()["checkpoint_path"] is None
    outputs.on_step_end(2, [trial])  # still inside the throttle
    assert row()["steps"] == 0
    time.sleep(0.25)
    # No further result comes (the trial stalls): the loop's next step writes what it holds.
    outputs.on_step_end(3, [trial])
    assert row()["steps"] == 10 and row()["checkpoint_path"] == "/ckpt/10"
    mtime = (tmp_path / "s" / "trials.parquet").stat().st_mtime_ns
    time.sleep(0.25)
    outputs.on_step_end(4, [trial])  # nothing new: no rewrite
    assert (tmp_path / "s" / "trials.parquet").stat().st_mtime_ns == mtime
