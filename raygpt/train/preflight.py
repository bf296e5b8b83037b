"""The checks a run or sweep makes before Ray starts: data, pretrained fit, resume compatibility,
and the run and sweep records (run.json, sweep.json) with their resumes."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from raygpt import checkpoint, results
from raygpt.config.train import TrainConfig
from raygpt.data import prepare, sampler
from raygpt.eval import during_training
from raygpt.model import generate, init_from
from raygpt.redact import redact_config
from raygpt.storage import Storage
from raygpt.train import trackers
from raygpt.train.trainer import in_process_use_gpu, runs_in_process


def check_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What a run's or a sweep's config asks for that can be checked before Ray starts,
    after the tracker packages (check_trackers): the data (prepared here, once), the
    pretrained fit, the sample prompt's tokens and HellaSwag. Returns the data's facts."""
    _, meta = prepare_data(cfg)
    generate.check(cfg, meta)  # --sample-prompt in the dataset's tokenizer
    during_training.check(cfg, meta)  # HellaSwag downloaded (once) and readable
    return meta


def check_trackers(cfg: TrainConfig) -> None:
    """--wandb / --mlflow without their package, and an MLflow server that cannot be
    reached or refuses the credentials: said first, before anything is written (the data
    cache included)."""
    trackers.check_installed(cfg)
    if cfg.mlflow is not None:
        trackers.check_mlflow_server(cfg.mlflow)


def data_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What run.json and sweep.json record about the data."""
    return {k: meta.get(k) for k in checkpoint.RECORDED_DATA_KEYS}


def prepare_data(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """Prepare (or reuse) the dataset and check the block size fits it, before Ray starts."""
    dataset_dir, meta = prepare.prepare_from_config(cfg)
    check_init_from(cfg, meta)
    train_batches = sampler.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    train_batches.sample_indices(
        0, 0, 0, cfg.micro_batch_size(), cfg.num_workers, cfg.grad_accum_steps()
    )
    sampler.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)  # raises if val is too short
    return dataset_dir, meta


def check_init_from(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """Pretrained weights or a raygpt checkpoint (init_from) must cover the block size and
    the vocabulary, and a checkpoint must share the data's tokenizer: say so before Ray
    starts, not from inside a worker after the weights loaded (the loop checks again)."""
    init_from.check_init_fit(cfg, meta)


def check_resume_compatible(
    storage: Storage, run_path: str, cfg: TrainConfig, meta: dict[str, Any]
) -> int:
    """Refuse, before Ray starts, a resume that the loop would refuse once the state is
    loaded: another model, other data (`meta`), another optimizer or dtype, any key
    outside config.resume.RESUME_MAY_CHANGE, or NaN weights. Returns the step it resumes from
    (0: the run has no checkpoint yet). Writes nothing."""
    latest = checkpoint.latest_in_run(run_path, storage)
    if latest is None:
        return 0
    state = checkpoint.load(latest, storage)
    checkpoint.check_compatible(state, cfg.to_dict(), meta, _known_dtype(cfg))
    checkpoint.check_finite(
        state["model"],
        f"cannot resume: checkpoint {storage.display(latest)}",
        checkpoint.NAN_RESUME_HINT,
    )
    return int(state.get("step") or 0)


def check_sweep_resume(
    storage: Storage, sweep_path: str, train: TrainConfig, meta: dict[str, Any]
) -> None:
    """The resume check of a sweep, against what its sweep.json recorded: its trials'
    checkpoints must match their configs, which the base config (`train`) feeds."""
    record = _read_record(storage, f"{sweep_path}/{results.SWEEP_FILE}")
    if record is None:
        return
    kwargs = {"source": "the sweep", "kind": "sweep"}
    checkpoint.check_same_data(record.get("data") or {}, meta, **kwargs)
    checkpoint.check_config(current_config(record), train.to_dict(), **kwargs)


def _known_dtype(cfg: TrainConfig) -> str | None:
    """The compute dtype the run will use, where the driver can know it: an explicit one,
    or auto on this machine for a run in this process. None: the workers' devices decide,
    and the loop compares it once the state is loaded."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if not runs_in_process(cfg):
        return None
    import torch

    from raygpt.runtime import dtype_name, resolve_dtype

    device = torch.device("cuda" if in_process_use_gpu(cfg.use_gpu) else "cpu")
    return dtype_name(resolve_dtype("auto", device))


def write_record(
    storage: Storage,
    path: str,
    metadata: dict[str, Any],
    resumed: bool = False,
    from_step: int | None = None,
) -> None:
    """Write run.json or sweep.json: `metadata` for a new run; for a resume, the record as
    the run began with one more entry in its `resumes` list: {"at": ISO time,
    "from_step": N (a run's), "changes": {key: [old, new]}}.

    The config a run trains with now is thus the first one with every resume's changes
    applied (`current_config`), and the record still says what the first steps ran with.
    A sweep's own settings that changed are named "sweep.KEY".
    """
    # Compared as written, secrets masked: the record read back holds them masked.
    metadata = redact_config(metadata)
    previous = _read_record(storage, path) if resumed else None
    if previous is None:
        results.write_json(storage, path, metadata)
        return
    changes = checkpoint.config_changes(current_config(previous), metadata["config"])
    if isinstance(metadata.get("sweep"), dict):
        before = current_config(previous, "sweep")
        for key, values in checkpoint.config_changes(before, metadata["sweep"]).items():
            changes[f"sweep.{key}"] = values
    entry: dict[str, Any] = {"at": datetime.datetime.now(datetime.UTC).isoformat()}
    if from_step is not None:
        entry["from_step"] = from_step
    entry["changes"] = changes
    previous.setdefault("resumes", []).append(entry)
    results.write_json(storage, path, previous)


def current_config(record: dict[str, Any], section: str = "config") -> dict[str, Any]:
    """A run record's config (or, with section "sweep", a sweep's settings) as the latest
    resume left it: the first one with every resume's changes applied in turn."""
    config = dict(record.get(section) or {})
    prefix = "" if section == "config" else f"{section}."
    for entry in record.get("resumes") or []:
        for key, (_, new) in (entry.get("changes") or {}).items():
            if prefix and key.startswith(prefix):
                config[key[len(prefix) :]] = new
            elif not prefix and "." not in key:
                config[key] = new
    return config


def _read_record(storage: Storage, path: str) -> dict[str, Any] | None:
    """A run's or sweep's record, or None where there is none to keep (absent, or not a
    record: it is then written afresh)."""
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_bytes(path))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None
