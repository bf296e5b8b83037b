"""What the driver tells every rank's loop beyond its config: where the run writes what
Ray Train does not (step parts, TensorBoard, a trial's log) and which way it reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raygpt.storage import Storage


@dataclass(frozen=True)
class RunWiring:
    """Pickled into the TorchTrainer's loop config, so every rank gets the same."""

    storage: Storage  # the run folder's parent (a sweep's: <sweep>/runs)
    # Every step part's footer: config, versions, cluster (the loop adds the ranks' hardware).
    metadata: dict[str, Any] | None = None
    # In this process (Ray Train's local mode, no storage context): the folder and name
    # the driver chose, and the device. A worker group gets them from Ray Train.
    in_process: bool = False
    run_path: str | None = None
    run_name: str | None = None
    device: str | None = None
    # A one-worker sweep trial runs the loop in its Tune trial's process and reports to
    # Tune directly, checkpoints included.
    tune_session: bool = False
    tensorboard_path: str | None = None  # default: <run folder>/tensorboard
    log_path: str | None = None  # a sweep trial's own log file, kept by rank 0
    echo: bool = True  # a trial's lines on the console as well as in its log
    hparams: dict[str, Any] | None = None  # a trial's searched values: TensorBoard's HParams
