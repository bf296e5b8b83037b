"""The machine-local cache of prepared datasets, and the lock its preparers share.

Small datasets are prepared into ``$RAYGPT_DATA_DIR`` (default ``~/.cache/raygpt``),
one folder each, built under a temporary name and renamed into place, so a crash
never leaves half a dataset and concurrent preparers cannot corrupt one another.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from raygpt.data.common import one_line
from raygpt.errors import UserError

DATA_DIR_ENV = "RAYGPT_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/raygpt"


def data_root(data_dir: str | Path | None = None) -> Path:
    """The cache root: `data_dir`, else $RAYGPT_DATA_DIR, else ~/.cache/raygpt (created)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    root = Path(data_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create data directory {root} ({one_line(exc)}); "
            f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a writable directory"
        ) from exc
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (saves duplicate work; atomic renames keep it correct)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def discard(path: Path) -> None:
    """Move a directory aside atomically, then delete it."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "data"
