"""A sweep trial's console lines, kept in its own log file instead of the sweep's console.

Rank 0 of a trial writes its progress lines (and any warnings printed in its
process) to `<sweep>/logs/<trial_id>.log` on the sweep's storage, so the
driver's console holds one live view rather than every trial's lines
interleaved. The file is written when the attempt starts, whole before each
report (one PUT on object storage; a trial's log is a few kilobytes) and when
the trial ends, so a killed trial's log is as fresh as its last report. A restarted trial writes
`<trial_id>.1.log`, `.2.log` and so on beside it. `echo` (`--verbose`) also
passes the lines on to the process's own streams, which Ray forwards to the
driver.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from raygpt.storage import Storage


class _Tee(io.TextIOBase):
    def __init__(self, buffer: io.StringIO, lock: threading.Lock, echo: TextIO | None):
        self.buffer_ = buffer
        self.lock = lock
        self.echo = echo

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer_.write(text)
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()


class TrialLog:
    """Captures sys.stdout and sys.stderr into one text kept on storage at `path`."""

    def __init__(self, store: Storage, path: str, echo: bool = False):
        self.store = store
        self.path = path
        self.echo = echo
        self._buffer = io.StringIO()
        self._lock = threading.Lock()
        self._saved: tuple[TextIO, TextIO] | None = None

    def save(self) -> None:
        with self._lock:
            text = self._buffer.getvalue()
        self.store.write_bytes(self.path, text.encode())

    @contextlib.contextmanager
    def capture(self) -> Iterator[TrialLog]:
        # The file exists from the attempt's first moment, so the next attempt's
        # attempt_path never takes this one's name, however early this one dies.
        self.save()
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(self._buffer, self._lock, self._saved[0] if self.echo else None)
        sys.stderr = _Tee(self._buffer, self._lock, self._saved[1] if self.echo else None)
        try:
            yield self
        finally:
            sys.stdout, sys.stderr = self._saved
            with contextlib.suppress(Exception):  # the log must never mask the trial's error
                self.save()


def attempt_path(store: Storage, path: str) -> str:
    """This attempt's own file: `X.log` for a trial's first attempt, `X.1.log`, `X.2.log`
    ... for restarts (a retry, a restored sweep, a PBT clone). Never an earlier attempt's
    file: the process of an attempt whose driver was killed can outlive it for seconds,
    and its saves must not overwrite the lines of the attempt that replaced it."""
    if not store.exists(path):
        return path
    stem = path.removesuffix(".log")
    n = 1
    while store.exists(f"{stem}.{n}.log"):
        n += 1
    return f"{stem}.{n}.log"


@contextlib.contextmanager
def maybe_capture(store: Storage, path: str | None, echo: bool) -> Iterator[TrialLog | None]:
    """TrialLog.capture() into this attempt's file when a path is given, else nothing."""
    if not path:
        yield None
        return
    with TrialLog(store, attempt_path(store, path), echo).capture() as log:
        yield log


def quiet_ray_train_logs() -> None:
    """Ray Train logs each report, metrics included, at INFO: keep the console readable.

    Some Ray Train V2 modules name their logger by file path (`getLogger(__file__)`),
    outside the "ray.train" hierarchy, so those are found by path.
    """
    marker = os.sep + os.path.join("ray", "train") + os.sep
    for name in ["ray.train", *logging.Logger.manager.loggerDict]:
        if name.startswith("ray.train") or marker in name:
            logging.getLogger(name).setLevel(logging.WARNING)
