"""One trial: a Tune function trainable that runs the shared training loop once.

Tune calls it in a trial actor with the searched parameters; everything else
(the base config, where the sweep's folder is, GPU shares, the driver's RAYGPT_*
settings) is bound by the driver with `tune.with_parameters`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raygpt import results
from raygpt.config.train import TrainConfig
from raygpt.storage import Storage
from raygpt.sweep.search import trial_params
from raygpt.train import trainer
from raygpt.train.wiring import RunWiring

LOGS_DIR = "logs"  # each trial's captured lines, inside the sweep folder


def run_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    store: Storage,
    sweep_path: str,
    use_gpu: bool,
    gpus_per_worker: float,
    env: dict[str, str],
    metadata: dict[str, Any],
    local: bool,
    echo: bool,
) -> None:
    """A Tune function trainable: one TorchTrainer run of the shared training loop."""
    import ray.tune

    os.environ.update(env)  # the driver's RAYGPT_* settings, on to the trial's workers
    if not echo:
        # Ray Train and Tune log at INFO from inside the trial (local mode announces
        # itself); those lines belong in Ray's logs, not the trial's.
        logging.getLogger("ray").setLevel(logging.WARNING)

    params = trial_params(config, base["seed"])
    cfg = TrainConfig.from_dict({**base, **params}).validate()
    trial_id = ray.tune.get_context().get_trial_id()
    if local and use_gpu:
        # A packed trial trains in this process: it may allocate its share of the GPU and
        # no more, so outgrowing it fails this trial alone, not its neighbours.
        from raygpt.runtime import limit_gpu_memory

        limit_gpu_memory(gpus_per_worker)
    callbacks = []
    if not local:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    # The trainer's name is the trial id: a restored trial finds its own checkpoints.
    torch_trainer = trainer.build_trainer(
        cfg,
        name=trial_id,
        storage=store.at(f"{sweep_path}/{results.RUNS_DIR}"),
        use_gpu=use_gpu,
        gpus_per_worker=gpus_per_worker,
        callbacks=callbacks,
        run_info={"trial_id": trial_id},
        wiring=RunWiring(
            storage=store,
            tensorboard_path=f"{sweep_path}/{results.TENSORBOARD_DIR}/{trial_id}",
            metadata=metadata,
            tune_session=local,
            log_path=f"{sweep_path}/{LOGS_DIR}/{trial_id}.log",
            echo=echo,
            # What the search chose (and a momentum optimizer's momentum, as trials.parquet
            # has it), for TensorBoard's HParams tab.
            hparams=params | ({"momentum": cfg.momentum} if cfg.optimizer == "momentum" else {}),
        ),
        in_process=local,
    )
    torch_trainer.fit()
