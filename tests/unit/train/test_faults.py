"""Fault injection: each mode does what the reliability drills rely on, once."""

from __future__ import annotations

import pytest

from raygpt.train import faults


def test_stall_waits_on_the_named_rank_step_and_optimizer_only(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv(faults.FAIL_AT_ENV, "0:30:stall:sgd")
    faults.maybe_inject_fault(0, 29, resumed=False, optimizer="sgd")
    faults.maybe_inject_fault(1, 30, resumed=False, optimizer="sgd")
    faults.maybe_inject_fault(0, 30, resumed=False, optimizer="adamw")
    faults.maybe_inject_fault(0, 30, resumed=True, optimizer="sgd")  # a resumed run goes on
    assert slept == []
    faults.maybe_inject_fault(0, 30, resumed=False, optimizer="sgd")
    assert slept == [faults.STALL_S]


def test_raise_names_the_step_and_rank(monkeypatch):
    monkeypatch.setenv(faults.FAIL_AT_ENV, "1:3:raise")
    faults.maybe_inject_fault(0, 3, resumed=False, optimizer="adamw")
    with pytest.raises(RuntimeError, match="injected fault at step 3 on rank 1"):
        faults.maybe_inject_fault(1, 3, resumed=False, optimizer="adamw")
