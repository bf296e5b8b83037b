"""Training state on disk: save, load, and find the latest of a run.

A checkpoint is a directory with one `state.pt`: model, optimizer and scaler
state, the step, the run config and the data's vocabulary. (No RNG state: the
loop seeds every step from (seed, rank, step), so a resumed run draws the same.) It is
written to a temporary name and renamed (a crash never leaves half a file), handed
to Ray Train, which copies it to the run folder on the storage (local, NFS or an
object store), and read back with `torch.load(weights_only=True)`, which unpickles
no code.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from raygpt.errors import UserError
from raygpt.storage import Storage
from raygpt.storage import resolve as storage_resolve

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


def load(
    location: str | Path, storage: Storage | None = None, map_location: str = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint folder (or its state.pt) on `storage` (default: the local disk).

    Tensors land on the CPU whatever device saved them, and the caller moves the
    model and optimizer state where they belong: a GPU-sized copy of the state
    does not linger on the device for the rest of the run. A damaged file is one
    clear line.
    """
    storage = storage if storage is not None else _local(location)
    path = str(location)
    if not path.endswith(STATE_FILE):
        path = f"{path.rstrip('/')}/{STATE_FILE}"
    if not storage.exists(path):
        raise UserError(
            f"no checkpoint at {storage.display(path)}; give a checkpoint folder or a run folder"
        )
    try:
        if storage.is_local:
            state = torch.load(path, map_location=map_location, weights_only=True)
        else:
            buffer = io.BytesIO(storage.read_bytes(path))
            state = torch.load(buffer, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"checkpoint {storage.display(path)} is damaged or not a raygpt checkpoint "
            f"({first_line[:120]}); delete it to fall back to an earlier one"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(
            f"checkpoint {storage.display(path)} is not a raygpt checkpoint (no model/config)"
        )
    return state


def _local(location: str | Path) -> Storage:
    return Storage(uri=str(location), fs=pafs.LocalFileSystem(), root=str(location))


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


def checkpoints_in_run(run: str | Path, storage: Storage | None = None) -> list[str]:
    """A run folder's checkpoint folders that hold a state file, newest step first.

    One recursive listing: on object storage each listing is a request.
    """
    storage = storage if storage is not None else _local(run)
    selector = pafs.FileSelector(str(run), recursive=True, allow_not_found=True)
    found = []
    for info in storage.fs.get_file_info(selector):
        if info.base_name != STATE_FILE or info.type != pafs.FileType.File:
            continue
        folder = info.path[: -len(STATE_FILE) - 1]
        if m := _CHECKPOINT_RE.search(folder.rsplit("/", 1)[-1]):
            found.append((int(m.group(1)), folder))
    return [p for _, p in sorted(found, reverse=True)]


def latest_in_run(run: str | Path, storage: Storage | None = None) -> str | None:
    """Newest checkpoint folder (highest step) of a run folder, or None."""
    found = checkpoints_in_run(run, storage)
    return found[0] if found else None


def resolve(path_or_run: str, storage_path: str = "~/ray_results") -> tuple[Storage, str]:
    """(storage, checkpoint folder) from a checkpoint folder, a state.pt, a run folder or a
    run name under storage_path; local paths and s3:// or gs:// URIs alike."""
    tried = []
    candidates = [storage_resolve(str(path_or_run), check=False)]
    if "://" not in str(path_or_run):
        under = storage_resolve(str(storage_path), check=False)
        candidates.append(under.at(under.path(str(path_or_run))))
    for store in candidates:
        tried.append(store.display())
        root = store.root
        if root.endswith(STATE_FILE) and store.exists(root):
            return store, root[: -len(STATE_FILE) - 1]
        if store.exists(f"{root}/{STATE_FILE}"):
            return store, root
        if store.is_dir(root) and (latest := latest_in_run(root, store)) is not None:
            return store, latest
    raise UserError(
        f"no checkpoint found for {path_or_run!r} (looked in {' and '.join(tried)}); "
        "give a checkpoint folder, a run folder or a run name under --storage-path"
    )
