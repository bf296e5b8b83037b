"""raygpt.status: the divergence rule and the one decision of how a trial or run ended."""

from __future__ import annotations

import math

import pytest

from raygpt import status


@pytest.mark.parametrize(
    ("loss", "first", "factor", "expected"),
    [
        (math.nan, 4.0, 3.0, True),  # a NaN always diverges
        (math.inf, 4.0, 3.0, True),
        (-math.inf, None, 0.0, True),  # non-finite wins even with the factor off
        (12.0, 4.0, 3.0, False),  # exactly factor x first is still fine
        (12.0001, 4.0, 3.0, True),
        (100.0, 4.0, 0.0, False),  # factor 0 disables the ratio rule
        (100.0, None, 3.0, False),  # no first loss yet: only non-finite counts
        (3.9, 4.0, 3.0, False),
    ],
)
def test_is_diverged(loss, first, factor, expected):
    assert status.is_diverged(loss, first, factor) is expected


def test_decide_precedence_error_then_divergence_then_steps():
    # An error outranks divergence, and divergence outranks a short step count.
    assert status.decide(errored=True, diverged=True, steps=3, max_steps=10) == status.ERROR
    assert status.decide(errored=False, diverged=True, steps=3, max_steps=10) == status.DIVERGED
    assert status.decide(errored=False, diverged=True, steps=10, max_steps=10) == status.DIVERGED


@pytest.mark.parametrize(
    ("steps", "max_steps", "ended", "expected"),
    [
        (10, 10, True, status.COMPLETED),
        (12, 10, True, status.COMPLETED),  # past max_steps (a resumed run) is complete
        (9, 10, True, status.STOPPED_EARLY),
        (9, 10, False, status.RUNNING),  # rows read back may belong to a live run
        (None, 10, True, status.STOPPED_EARLY),  # no step at all counts as zero
        (None, 10, False, status.RUNNING),
        (3, None, True, status.COMPLETED),  # unknown max_steps: completed
        (None, None, False, status.COMPLETED),
    ],
)
def test_decide_by_steps(steps, max_steps, ended, expected):
    got = status.decide(
        errored=False, diverged=False, steps=steps, max_steps=max_steps, ended=ended
    )
    assert got == expected


def test_status_groups_are_consistent():
    assert set(status.ALL) == {
        status.COMPLETED,
        status.STOPPED_EARLY,
        status.DIVERGED,
        status.ERROR,
        status.RUNNING,
    }
    assert len(status.ALL) == len(set(status.ALL))
    # Diverged and errored trials never win a sweep, nor count as a finished answer.
    for bad in (status.DIVERGED, status.ERROR):
        assert bad not in status.CAN_WIN
        assert bad not in status.FINISHED_OK
    assert set(status.FINISHED_OK) <= set(status.CAN_WIN) <= set(status.ALL)
    assert status.RUNNING not in status.FINISHED_OK
