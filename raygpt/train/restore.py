"""Where a rank's starting state comes from: the newest sound checkpoint of its run, or
the one Tune hands a trial."""

from __future__ import annotations

from typing import Any

import ray.train
import torch

from raygpt import checkpoint
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.runtime import restore_grad_scaler
from raygpt.storage import Storage
from raygpt.train import optim


def newest_state(run: Storage, run_path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest loadable checkpoint of this run (state on the CPU, and its folder), or None.

    Ray hands back the latest checkpoint its controller registered, but a rank
    that dies right after a report can beat the controller's next poll, leaving
    a newer checkpoint on storage that Ray never registered. Checkpoint folders
    are named by step, so the newest on storage wins; one damaged by a crash
    mid-upload is skipped in favour of the one before it.
    """
    candidates = checkpoint.checkpoints_in_run(run_path, run)
    registered = ray.train.get_checkpoint()
    if registered is not None and registered.path not in candidates:
        candidates.append(registered.path)
    for path in candidates:
        try:
            return checkpoint.load(path, run), path
        except UserError as err:
            print(f"[raygpt] skipping checkpoint {path}: {err}", flush=True)
    return None, None


def tune_checkpoint_state() -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint Tune hands this trial: its own latest (a restored sweep, a retry
    after a failure, a HyperBand pause) or, under PBT, the one cloned from a better trial."""
    import ray.tune

    found = ray.tune.get_checkpoint()
    if found is None:
        return None, None
    with found.as_directory() as folder:
        return checkpoint.load(folder), found.path


def resume_from(
    state: dict[str, Any],
    shown: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    cfg: TrainConfig,
    meta: dict[str, Any],
    dtype: str,
) -> tuple[int, float | None, float, float | None]:
    """Load a checkpoint's state into this rank's model, optimizer and scaler, after
    checking that it fits this run (`shown`: where it is, as errors name it); (step, first loss, best val, last val) to go on from."""
    # Checked before Ray starts too (preflight.check_resume_compatible); here the dtype is
    # the device's own, and a Tune trial's checkpoint is checked at all.
    checkpoint.check_compatible(state, cfg.to_dict(), meta, dtype)
    checkpoint.check_finite(
        state["model"], f"cannot resume: checkpoint {shown}", checkpoint.NAN_RESUME_HINT
    )
    model.load_state_dict(state["model"])
    optim.load_state(optimizer, state["optimizer"])  # with this config's hyperparameters
    restore_grad_scaler(scaler, state["scaler"])
    return state["step"], state["first_loss"], state["best_val_loss"], state.get("last_val_loss")
