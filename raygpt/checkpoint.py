"""Training state on disk: save, load, and find the latest of a run.

A checkpoint is a directory with one `state.pt`: model, optimizer and scaler
state, the step, RNG states, the run config and the data's vocabulary. It is
written to a temporary name and renamed (a crash never leaves half a file) and
read with `torch.load(weights_only=True)`, which unpickles no code.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from raygpt.errors import UserError

STATE_FILE = "state.pt"
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / STATE_FILE


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory (or a state.pt path); a damaged file is one clear line."""
    path = Path(directory)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; give a checkpoint folder or a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"checkpoint {path} is damaged or not a raygpt checkpoint ({first_line[:120]}); "
            "delete it to fall back to an earlier one"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {path} is not a raygpt checkpoint (no model/config)")
    return state


def check_compatible(state: dict[str, Any], config: dict[str, Any], vocab_size: int) -> None:
    """Refuse a checkpoint whose model shape or vocabulary differs from this run's."""
    saved = state["config"]
    for key in MODEL_KEYS:
        if saved.get(key) != config.get(key):
            raise UserError(
                f"checkpoint has {key}={saved.get(key)} but this run has {key}={config.get(key)}; "
                "use the checkpoint's model settings or start a new run (--name)"
            )
    saved_vocab = state.get("data", {}).get("vocab_size")
    if saved_vocab != vocab_size:
        raise UserError(
            f"checkpoint vocabulary has {saved_vocab} tokens but this data has {vocab_size}; "
            "train on the same dataset/tokenizer or start a new run (--name)"
        )


_CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)$")


def checkpoints_in_run(run_dir: str | Path) -> list[Path]:
    """A run folder's checkpoint directories that hold a state file, newest step first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(run_dir).glob("checkpoint_*")
        if (m := _CHECKPOINT_RE.search(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_in_run(run_dir: str | Path) -> Path | None:
    """Newest checkpoint directory (highest step) of a run folder, or None."""
    found = checkpoints_in_run(run_dir)
    return found[0] if found else None


def resolve(path_or_run: str | Path, storage_path: str | Path = "~/ray_results") -> Path:
    """A checkpoint folder from a checkpoint folder, a state.pt, a run folder or a run name."""
    candidates = [Path(path_or_run).expanduser()]
    candidates.append(Path(storage_path).expanduser() / str(path_or_run))
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file() or candidate.name == STATE_FILE:
            return candidate
        if candidate.is_dir() and (latest := latest_in_run(candidate)) is not None:
            return latest
    raise UserError(
        f"no checkpoint found for {path_or_run!r} (looked in {candidates[0]} and {candidates[1]}); "
        "give a checkpoint folder, a run folder or a run name under --storage-path"
    )
