"""raygpt.sweep.trial, its Ray-free part: what run_trial does before it needs a Tune trial
(the driver's environment applied, Ray's log level, the searched values validated into a
TrainConfig with one-line errors). Past that it needs a Tune session, so a live trial is
left to the sweep tests on a cluster."""

from __future__ import annotations

import inspect
import logging
import os

import pytest
import ray
from conftest import one_line

from raygpt import storage
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.sweep import trial


@pytest.fixture
def ray_logger():
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(level)


def _run(tmp_path, config, *, echo, env=None):
    base = TrainConfig(storage_path=str(tmp_path)).validate().to_dict()
    trial.run_trial(
        config,
        base=base,
        store=storage.resolve(str(tmp_path), check=False),
        sweep_path=str(tmp_path / "sweep"),
        use_gpu=False,
        gpus_per_worker=0.0,
        env=env or {},
        metadata={},
        local=True,
        echo=echo,
    )


def test_bad_searched_values_fail_in_one_line_before_any_tune_call(
    tmp_path, monkeypatch, ray_logger
):
    # Set here so that monkeypatch restores it: run_trial updates os.environ in place.
    monkeypatch.setenv("RAYGPT_UNIT_TRIAL", "off")
    config = {"point": {"optimizer": "adamw", "learning_rate": -0.5}}
    with pytest.raises(UserError) as err:
        _run(tmp_path, config, echo=False, env={"RAYGPT_UNIT_TRIAL": "on"})
    assert "learning_rate=-0.5" in one_line(err)
    # The driver's RAYGPT_* settings reach the trial's process (and its workers) first.
    assert os.environ["RAYGPT_UNIT_TRIAL"] == "on"
    # Ray's INFO lines belong in Ray's logs, not the trial's.
    assert ray_logger.level == logging.WARNING
    assert not ray.is_initialized()
    assert not (tmp_path / "sweep").exists()  # nothing written


def test_verbose_trials_keep_rays_log_level(tmp_path, ray_logger):
    # An optimizer's own learning-rate dimension (adamw_learning_rate) stands for
    # learning_rate.
    with pytest.raises(UserError, match="learning_rate=-1"):
        _run(tmp_path, {"optimizer": "adamw", "adamw_learning_rate": -1.0}, echo=True)
    assert ray_logger.level == logging.INFO


def test_run_trial_takes_what_the_driver_binds():
    # The sweep driver binds every parameter but Tune's `config` with tune.with_parameters.
    params = list(inspect.signature(trial.run_trial).parameters)
    assert params[0] == "config"
    assert set(params[1:]) == {
        "base",
        "store",
        "sweep_path",
        "use_gpu",
        "gpus_per_worker",
        "env",
        "metadata",
        "local",
        "echo",
    }
    assert trial.LOGS_DIR == "logs"
