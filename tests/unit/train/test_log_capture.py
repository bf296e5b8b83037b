"""raygpt.train.log_capture: a trial's printed lines kept in its own attempt's log file."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from raygpt import storage
from raygpt.train import log_capture
from raygpt.train.log_capture import TrialLog, attempt_path, maybe_capture


@pytest.fixture
def store(tmp_path):
    return storage.resolve(str(tmp_path), check=False)


def test_attempt_path_never_reuses_an_earlier_attempts_file(store, tmp_path):
    path = store.path("logs", "trial_1.log")
    assert attempt_path(store, path) == path  # the first attempt
    store.write_bytes(path, b"first")
    assert attempt_path(store, path) == store.path("logs", "trial_1.1.log")
    store.write_bytes(store.path("logs", "trial_1.1.log"), b"second")
    assert attempt_path(store, path) == store.path("logs", "trial_1.2.log")
    # Another trial's files do not count.
    assert attempt_path(store, store.path("logs", "trial_2.log")) == store.path(
        "logs", "trial_2.log"
    )
    assert sorted(os.listdir(tmp_path / "logs")) == ["trial_1.1.log", "trial_1.log"]


def test_capture_writes_at_start_and_keeps_print_and_stderr(store, tmp_path, capsys):
    path = store.path("logs", "t.log")
    log = TrialLog(store, path)
    out_before, err_before = sys.stdout, sys.stderr
    with log.capture() as same:
        assert same is log
        # The file exists from the first moment, empty, before anything was printed.
        assert (tmp_path / "logs" / "t.log").read_text() == ""
        print("step 1 loss 4.2")
        print("a warning", file=sys.stderr)
        # Not on disk until a save (one PUT per report on object storage).
        assert (tmp_path / "logs" / "t.log").read_text() == ""
        log.save()
        assert (tmp_path / "logs" / "t.log").read_text() == "step 1 loss 4.2\na warning\n"
        print("step 2 loss 3.9")
    assert (sys.stdout, sys.stderr) == (out_before, err_before)  # streams given back
    assert (tmp_path / "logs" / "t.log").read_text() == (
        "step 1 loss 4.2\na warning\nstep 2 loss 3.9\n"
    )
    # Without echo nothing reached the process's own streams.
    assert capsys.readouterr() == ("", "")
    print("after")  # no longer captured
    assert "after" not in (tmp_path / "logs" / "t.log").read_text()


def test_echo_passes_lines_on_as_well(store, tmp_path, capsys):
    with TrialLog(store, store.path("e.log"), echo=True).capture():
        print("to both")
        print("err too", file=sys.stderr)
    assert capsys.readouterr() == ("to both\n", "err too\n")
    assert (tmp_path / "e.log").read_text() == "to both\nerr too\n"


def test_a_raising_trial_still_saves_its_log_and_the_error_propagates(store, tmp_path):
    out_before, err_before = sys.stdout, sys.stderr
    with pytest.raises(ZeroDivisionError), TrialLog(store, store.path("x.log")).capture():
        print("before the crash")
        _ = 1 / 0
    assert (tmp_path / "x.log").read_text() == "before the crash\n"
    assert (sys.stdout, sys.stderr) == (out_before, err_before)


def test_maybe_capture_without_a_path_captures_nothing(store, tmp_path, capsys):
    with maybe_capture(store, None, echo=False) as log:
        assert log is None
        print("plain")
    assert capsys.readouterr().out == "plain\n"
    assert list(tmp_path.iterdir()) == []


def test_maybe_capture_takes_the_next_attempts_name(store, tmp_path):
    path = store.path("logs", "trial.log")
    with maybe_capture(store, path, echo=False) as log:
        assert log is not None and log.path == path
        print("attempt 0")
    with maybe_capture(store, path, echo=False) as log:
        assert log.path == store.path("logs", "trial.1.log")
        print("attempt 1")
    assert (tmp_path / "logs" / "trial.log").read_text() == "attempt 0\n"
    assert (tmp_path / "logs" / "trial.1.log").read_text() == "attempt 1\n"


def test_quiet_ray_train_logs_by_name_and_by_path():
    by_path = logging.getLogger(os.sep + os.path.join("site", "ray", "train", "v2", "x.py"))
    child = logging.getLogger("ray.train.unit_test_child")
    other = logging.getLogger("raygpt.unit_test_other")
    saved = {lg: lg.level for lg in (by_path, child, other, logging.getLogger("ray.train"))}
    try:
        for lg in (by_path, child, other):
            lg.setLevel(logging.INFO)
        log_capture.quiet_ray_train_logs()
        assert logging.getLogger("ray.train").level == logging.WARNING
        assert child.level == logging.WARNING
        assert by_path.level == logging.WARNING
        assert other.level == logging.INFO  # not Ray Train's
    finally:
        for lg, level in saved.items():
            lg.setLevel(level)
