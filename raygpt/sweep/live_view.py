"""The sweep's one live view on the console.

One line says how far the sweep has got: elapsed time, trials by status, steps
trained out of those planned, the best trial so far and an estimate of the time
left. On a terminal it is redrawn in place every second; in a log file or a pipe
it is printed as a new line every `LINE_EVERY_S` seconds. A finished trial gets
its own line above it. Trials' own lines go to their log files (train/log_capture.py).

Planned steps count max_steps for every trial not yet finished and the steps a
finished trial actually trained, so under ASHA the plan shrinks as trials are
stopped and the estimate is an upper bound.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.tune import Callback

from raygpt import status
from raygpt.sweep.trials_table import SweepOutputs, finished_line


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(
    records: list[dict[str, Any]], total_trials: int, max_steps: int, elapsed: float
) -> str:
    """The live view's text, from the trials table's rows (a pure function: tested alone)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    queued = max(0, total_trials - len(records))
    done_steps = sum(r["steps"] or 0 for r in records)
    planned = sum(
        (r["steps"] or 0) if r["status"] != status.RUNNING else max_steps for r in records
    )
    planned += queued * max_steps
    parts = [f"{counts.get(status.RUNNING, 0)} running"]
    parts += [
        f"{counts[s]} {s.replace('_', ' ')}"
        for s in status.ALL
        if s != status.RUNNING and counts.get(s)
    ]
    parts.append(f"{queued} queued")
    best = _best(records)
    best_text = (
        f"best {best['optimizer']} lr={best['learning_rate']:.3g} val {best['best_val_loss']:.4f}"
        if best
        else "best: none yet"
    )
    rate = done_steps / elapsed if elapsed > 0 else 0.0
    left = planned - done_steps
    eta = f"ETA <= {_duration(left / rate)}" if rate > 0 and left > 0 else "ETA n/a"
    if left <= 0 and records:
        eta = "ETA 0m00s"
    return (
        f"[sweep] {_duration(elapsed)} | trials {total_trials}: {', '.join(parts)} | "
        f"steps {done_steps:,}/{planned:,} | {best_text} | {eta}"
    )


def _best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    candidates = [
        r
        for r in records
        if r["status"] in status.CAN_WIN
        and r["best_val_loss"] is not None
        and math.isfinite(r["best_val_loss"])
    ]
    return min(candidates, key=lambda r: r["best_val_loss"], default=None)


class SweepProgress(Callback):
    """Draws progress_line from the trials the SweepOutputs callback keeps."""

    LINE_EVERY_S = 15.0
    REDRAW_EVERY_S = 1.0

    def __init__(self, outputs: SweepOutputs, total_trials: int, max_steps: int):
        self.outputs = outputs
        self.total_trials = total_trials
        self.max_steps = max_steps
        self._reset()

    def _reset(self) -> None:
        self._start = time.time()
        self._last = 0.0
        self._drawn = False
        self._tty = sys.stdout.isatty()

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("outputs", "total_trials", "max_steps")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _line(self) -> str:
        records = [r for r in self.outputs.records() if r["phase"] == self.outputs.phase]
        return progress_line(records, self.total_trials, self.max_steps, time.time() - self._start)

    def _draw(self, force: bool = False) -> None:
        now = time.time()
        every = self.REDRAW_EVERY_S if self._tty else self.LINE_EVERY_S
        if not force and now - self._last < every:
            return
        self._last = now
        if self._tty:
            sys.stdout.write("\r\x1b[K" + self._line())
            self._drawn = True
        else:
            sys.stdout.write(self._line() + "\n")
        sys.stdout.flush()

    def _above(self, text: str) -> None:
        """Print a line above the live one (which is then redrawn)."""
        if self._tty and self._drawn:
            sys.stdout.write("\r\x1b[K")
        sys.stdout.write(text + "\n")
        self._drawn = False
        self._draw(force=self._tty)

    def on_step_end(self, iteration, trials, **info) -> None:
        self._draw()

    def _finished(self, trial) -> None:
        record = self.outputs._load().get(trial.trial_id)
        if record is not None:
            self._above(finished_line(record))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finished(trial)

    def on_experiment_end(self, trials, **info) -> None:
        if self._tty and self._drawn:
            sys.stdout.write("\r\x1b[K")
        sys.stdout.write(self._line() + "\n")
        sys.stdout.flush()
