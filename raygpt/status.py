"""A trial's (or run's) status: the names, and the one place each is decided.

The loop decides divergence as it trains, the sweep driver decides how a trial
ended when Tune says it did, and the report derives a status from step rows
when a folder has no trials table. All three call the functions below, so the
rules cannot drift apart.
"""

from __future__ import annotations

import math

RUNNING = "running"
COMPLETED = "completed"  # trained to max_steps
STOPPED_EARLY = "stopped_early"  # a trial scheduler (ASHA) stopped it before max_steps
DIVERGED = "diverged"  # a loss went non-finite or above divergence_factor x the first
ERROR = "error"  # raised, or its workers died more often than allowed

# Display order in summaries and plots.
ALL = (COMPLETED, STOPPED_EARLY, DIVERGED, ERROR, RUNNING)
# Statuses whose best val loss may be the sweep's answer; diverged and errored never are.
CAN_WIN = (COMPLETED, STOPPED_EARLY, RUNNING)
# A sweep in which no trial reached one of these has found nothing.
FINISHED_OK = (COMPLETED, STOPPED_EARLY)


def is_diverged(train_loss: float, first_loss: float | None, factor: float) -> bool:
    """A non-finite loss, or one above `factor` x the first loss (factor 0 disables that)."""
    if not math.isfinite(train_loss):
        return True
    return bool(factor > 0 and first_loss is not None and train_loss > factor * first_loss)


def decide(
    *,
    errored: bool,
    diverged: bool,
    steps: int | None,
    max_steps: int | None,
    ended: bool = True,
) -> str:
    """The status of a trial, or of a run read back from its step rows.

    An error outranks divergence (the reason is the error), and divergence
    outranks the step count (a diverged run also stops early). Short of
    max_steps, a trial that `ended` was stopped early; rows read back from a
    folder (ended=False) may belong to a run still in progress. Without a known
    max_steps, a run not flagged otherwise counts as completed.
    """
    if errored:
        return ERROR
    if diverged:
        return DIVERGED
    if max_steps is not None and (steps or 0) < max_steps:
        return STOPPED_EARLY if ended else RUNNING
    return COMPLETED
