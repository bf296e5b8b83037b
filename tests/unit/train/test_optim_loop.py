"""The newer optimizers through the real training loop (in this process: no cluster needed).

Muon's own groups and schedule-free's train/eval switch live in the loop, around
evaluations and checkpoints, so a resumed run must equal an uninterrupted one
there, not only in a unit test of the optimizer.
"""

from __future__ import annotations

import pytest
from conftest import step_rows, tiny_config

from raygpt.train import driver as train_driver

SHORT = dict(max_steps=12, lr_decay_steps=12, eval_interval=6, warmup_steps=2, in_process="true")
RATES = {"muon": 0.03, "lion": 3e-3, "adamw_schedulefree": 1e-2}


@pytest.mark.parametrize("optimizer", sorted(RATES))
def test_new_optimizer_trains_and_resumes_exactly_in_the_loop(optimizer, tmp_path):
    common = dict(optimizer=optimizer, learning_rate=RATES[optimizer], batch_size=16)
    whole = train_driver.run(tiny_config(tmp_path, name="whole", **common, **SHORT))
    train_driver.run(tiny_config(tmp_path, name="split", **common, **{**SHORT, "max_steps": 6}))
    train_driver.run(tiny_config(tmp_path, name="split", resume=True, **common, **SHORT))
    a = {r["step"]: r["train_loss"] for r in step_rows(tmp_path / "whole")}
    b = {r["step"]: r["train_loss"] for r in step_rows(tmp_path / "split")}
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), (optimizer, step)
    assert a[12] < a[1] - 0.3, a  # it learns
    assert whole["val_loss"] < a[1]
