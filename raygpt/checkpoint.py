"""Training state on disk: save, load, and find the latest of a run.

A checkpoint is a directory with one `state.pt`: model, optimizer and scaler
state, the step, the run config, the compute dtype and the data's facts. (No RNG
state: the loop seeds every step from (seed, rank, step), so a resumed run draws the
same.) It is written to a temporary name and renamed (a crash never leaves half a
file), handed to Ray Train, which copies it to the run folder on the storage (local,
NFS or an object store), and read back with `torch.load(weights_only=True)`, which
unpickles no code.

A resume must match what the checkpoint was trained with (`check_compatible`): the
model, the data, the optimizer, the dtype and every config key outside
config.resume.RESUME_MAY_CHANGE. A diverged state is never saved, so the latest checkpoint
is always one whose weights are finite; `check_finite` refuses NaN weights wherever
they are loaded from (an older raygpt saved them).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from raygpt.config.io import flag_name
from raygpt.config.resume import (
    RESUME_MAY_CHANGE,
    RESUME_NOT_COMPARED,
    with_parametrization_defaults,
)
from raygpt.errors import UserError, first_line
from raygpt.redact import redact_config
from raygpt.storage import Storage
from raygpt.storage import resolve as storage_resolve

STATE_FILE = "state.pt"
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    *,
    step: int,
    first_loss: float | None,
    best_val_loss: float,
    last_val_loss: float | None,
    config: dict[str, Any],
    data_meta: dict[str, Any],
    dtype: str,
) -> dict[str, Any]:
    """What a checkpoint holds: the state a resume continues from, and the facts it is
    checked against (check_compatible). The tensors are the live ones, not copies."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "first_loss": first_loss,
        "best_val_loss": best_val_loss,
        "last_val_loss": last_val_loss,
        "config": config,
        # The shape itself: init_from runs' differs from the config's keys.
        "model_config": dataclasses.asdict(model.config),
        "data": {k: data_meta.get(k) for k in DATA_KEYS},
        # What dtype "auto" resolved to on this device: a resume must match.
        "dtype": dtype,
    }


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    # A checkpoint travels (copied, exported, shared): its config keeps no password of a
    # URI (--mlflow's), which nothing reads back from it.
    if "config" in state:
        state = {**state, "config": redact_config(state["config"])}
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
    # torch.load of bytes that are not a checkpoint raises what the unpickler trips on
    # (a KeyError or ValueError for arbitrary bytes), not only the unpickling errors.
    except (
        RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, KeyError,
        ValueError,
    ) as err:  # fmt: skip
        raise UserError(
            f"checkpoint {storage.display(path)} is damaged or not a raygpt checkpoint "
            f"({first_line(err)[:120]}); delete it to fall back to an earlier one"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(
            f"checkpoint {storage.display(path)} is not a raygpt checkpoint (no model/config)"
        )
    return state


def _local(location: str | Path) -> Storage:
    return Storage(uri=str(location), fs=pafs.LocalFileSystem(), root=str(location))


# What a checkpoint records about its data (loop.py saves them): a resume on other data is
# refused, and sample and export rebuild the tokenizer (a character vocabulary, a trained
# BPE's JSON) from them.
DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "itos", "source_sha256", "tokenizer_json")
# The ones run.json and sweep.json record: the character table and a BPE are for
# rebuilding a tokenizer, not for a person reading the record.
RECORDED_DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "source_sha256")
# The order a resume compares them in: the tokenizer first (the same ids would mean other
# text), then the text itself, then the prepared dataset's name (its val split included).
_DATA_ORDER = ("vocab_size", "tokenizer", "itos", "tokenizer_json", "source_sha256", "dataset")
# What to do about a run whose latest checkpoint holds NaN weights (an older raygpt saved
# one at a divergence; the loop now never does).
NAN_RESUME_HINT = (
    "delete that checkpoint folder to resume from the one before it, or start a new run "
    "with another --name"
)


def check_compatible(
    state: dict[str, Any], config: dict[str, Any], meta: dict[str, Any], dtype: str | None = None
) -> None:
    """Refuse to resume `state` with another model shape, other data (`meta`, the data's
    facts), another optimizer, another compute dtype, or any other key outside
    config.resume.RESUME_MAY_CHANGE: one line naming the key, its old and new values.

    `dtype` is this run's resolved compute dtype ("bfloat16"); None where it is not known
    yet (dtype auto before the workers' devices are), so that only an explicit one counts.
    """
    saved = state["config"]
    for key in MODEL_KEYS:
        if key in saved and saved.get(key) != config.get(key):
            raise UserError(
                f"cannot resume: the checkpoint has {key}={saved.get(key)} but this run has "
                f"{key}={config.get(key)}; resume with the checkpoint's model settings, "
                "or start a new run with another --name"
            )
    check_same_data(state.get("data") or {}, meta)
    check_config(saved, config, saved_dtype=state_dtype(state), dtype=dtype)


def check_same_data(
    saved: dict[str, Any], meta: dict[str, Any], source: str = "the checkpoint", kind: str = "run"
) -> None:
    """Refuse data whose facts (DATA_KEYS) differ from those a checkpoint or a sweep
    recorded (`source`); a fact the record lacks (an older one) is not compared."""
    new_run = f"or start a new {kind} with another --name"
    if "vocab_size" in saved and saved["vocab_size"] != meta.get("vocab_size"):
        raise UserError(
            f"cannot resume: {source}'s vocabulary has {saved['vocab_size']} tokens but this "
            f"data has {meta.get('vocab_size')}; resume on the same dataset and tokenizer, "
            f"{new_run}"
        )
    for key in _DATA_ORDER:
        if key in saved and _as_json(saved[key]) != _as_json(meta.get(key)):
            raise UserError(
                f"cannot resume: {source} was trained on data with {key}={_show(saved[key])} "
                f"but this {kind}'s data has {key}={_show(meta.get(key))}; resume on the same "
                f"data (text, tokenizer and dataset), {new_run}"
            )


def check_config(
    saved: dict[str, Any],
    config: dict[str, Any],
    saved_dtype: str | None = None,
    dtype: str | None = None,
    source: str = "the checkpoint",
    kind: str = "run",
) -> None:
    """Refuse a config that differs from the one `source` saved in a key outside
    RESUME_MAY_CHANGE.

    The global batch is compared as tokens_per_step resolves (batch_size x block_size x
    num_workers when not given), and dtype as it resolves on the device, where known. A
    saved config without the parametrization keys (an older raygpt's) was trained under sp.
    """
    new_run = f"or start a new {kind} with another --name"
    saved = with_parametrization_defaults(saved)
    old_tokens, new_tokens = _tokens_per_step(saved), _tokens_per_step(config)
    if None not in (old_tokens, new_tokens) and old_tokens != new_tokens:
        raise UserError(
            f"cannot resume: {source} has tokens_per_step={old_tokens} (tokens per optimizer "
            f"step) but this {kind} has tokens_per_step={new_tokens}; pass "
            f"--tokens-per-step {old_tokens}, {new_run}"
        )
    old_dtype = saved_dtype or _explicit_dtype(saved)
    new_dtype = dtype or _explicit_dtype(config)
    if None not in (old_dtype, new_dtype) and old_dtype != new_dtype:
        raise UserError(
            f"cannot resume: {source} was trained with dtype={old_dtype} but this {kind} "
            f"computes in dtype={new_dtype}; pass --dtype {old_dtype} (on a device that has "
            f"it), {new_run}"
        )
    changes = config_changes(saved, config)
    for key in sorted(changes, key=lambda k: k != "optimizer"):  # the optimizer first
        if key in RESUME_MAY_CHANGE or key in ("tokens_per_step", "dtype"):
            continue
        old, new = changes[key]
        flag = flag_name(key)
        how = f"leave out {flag}" if old is None else f"pass {flag} {_show(old)}"
        raise UserError(
            f"cannot resume: {source} has {key}={_show(old)} but this {kind} has "
            f"{key}={_show(new)}; {key} cannot change on a resume: {how}, {new_run}"
        )


def config_changes(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for every key whose value differs, as JSON would write them; keys
    that say how the run was asked for (its name, --resume) and keys either side lacks (a
    config of an older raygpt) are left out."""
    old, new = _plain(saved), _plain(config)
    return {
        key: [old[key], new[key]]
        for key in old
        if key in new and key not in RESUME_NOT_COMPARED and old[key] != new[key]
    }


def state_dtype(state: dict[str, Any]) -> str | None:
    """The compute dtype a checkpoint was trained in. A checkpoint that does not record it
    (an older raygpt's) says it by an explicit config dtype, or by a GradScaler state,
    which only float16 saves; else it is unknown."""
    if isinstance(state.get("dtype"), str):
        return state["dtype"]
    explicit = _explicit_dtype(state.get("config") or {})
    if explicit is not None:
        return explicit
    return "float16" if state.get("scaler") else None


def _explicit_dtype(config: dict[str, Any]) -> str | None:
    value = config.get("dtype")
    return value if isinstance(value, str) and value != "auto" else None


def _tokens_per_step(config: dict[str, Any]) -> int | None:
    if config.get("tokens_per_step") is not None:
        return config["tokens_per_step"]
    try:
        return config["batch_size"] * config["block_size"] * config["num_workers"]
    except (KeyError, TypeError):
        return None


def _plain(value: Any) -> Any:
    """As a record writes it (tuples as lists, secrets masked): a config read back from
    run.json or sweep.json compares equal to the live one, and no change names a secret."""
    return _as_json(redact_config(value))


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    """A value for a one-line message: long text cut to its start, lists by their length,
    newlines escaped."""
    if isinstance(value, list) and len(value) > 8:
        return f"<{len(value)} entries>"
    text = str(value)
    if len(text) > 40:
        text = text[:16] + "..."
    return text.encode("unicode_escape").decode("ascii")


def first_non_finite(weights: torch.nn.Module | dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None.

    One read of the device for all the tensors: the loop calls this at every checkpoint.
    """
    items = (
        weights.state_dict().items() if isinstance(weights, torch.nn.Module) else weights.items()
    )
    floats = [(k, v) for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(v).all().to(floats[0][1].device) for _, v in floats])
    if bool(finite.all()):
        return None
    return floats[int((~finite).nonzero()[0, 0])][0]


def check_finite(
    weights: torch.nn.Module | dict[str, Any],
    where: str,
    what_to_do: str = "use an earlier checkpoint folder, or train again with a lower learning rate",
) -> None:
    """Refuse NaN or infinite weights, which a diverged run leaves: one line naming `where`
    and the first such tensor, before anything is written from them."""
    name = first_non_finite(weights)
    if name is not None:
        raise UserError(
            f"{where} has NaN or infinite weights ({name}), as a diverged run leaves them; "
            f"{what_to_do}"
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
