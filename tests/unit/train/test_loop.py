"""raygpt.train.loop: the training loop run in this process (Ray Train's local mode, no Ray
session): a 12-step tiny run whose loss falls, with its step rows, parts, TensorBoard
files, checkpoints and final report; divergence, --eval-only, a trial's log capture."""

from __future__ import annotations

import math

import pytest
import ray
from conftest import TINY_IN_PROCESS, step_metadata, step_rows, tiny_config

from raygpt import storage
from raygpt.train import loop, trainer
from raygpt.train.faults import FAIL_AT_ENV
from raygpt.train.lr_schedule import lr_at
from raygpt.train.wiring import RunWiring

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "cats",
    "nap",
    "in",
    "warm",
    "sun",
]


@pytest.fixture
def corpus(tmp_path):
    """A small, very regular text: 12 steps of a tiny model visibly learn it."""
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(FAIL_AT_ENV, raising=False)  # no fault drill from the environment
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized()


def _fit(tmp_path, corpus, name, wiring_extra=None, **overrides):
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    values = TINY_IN_PROCESS | {"cpus_per_worker": 1.0, "learning_rate": 1e-2} | overrides
    cfg = tiny_config(
        results, name=name, data_file=str(corpus), data_dir=str(tmp_path / "data"), **values
    )
    store = storage.resolve(str(results), check=False)
    wiring = RunWiring(storage=store, metadata={"config": {"unit": name}}, **(wiring_extra or {}))
    built = trainer.build_trainer(
        cfg, name=name, storage=store, use_gpu=False, wiring=wiring, in_process=True
    )
    return cfg, built.fit(), results / name


def test_step_seed_and_due():
    seeds = {loop.step_seed(1337, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400  # every rank and step draws its own
    assert loop.step_seed(1337, 1, 5) == loop.step_seed(1337, 1, 5)
    assert 0 <= loop.step_seed(2**62, 3, 10**9) < 2**63
    assert [s for s in range(1, 13) if loop._due(s, 5, s == 12)] == [5, 10, 12]
    assert not any(loop._due(s, 0, True) for s in range(1, 13))  # 0: off, even at the end


def test_a_tiny_run_learns_and_writes_its_results(tmp_path, corpus, capfd):
    cfg, result, run_dir = _fit(tmp_path, corpus, "tiny")
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    # It learns: the last steps' mean loss is well below the first steps' (~0.4 here).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25, losses
    # Evaluations at eval_interval (6) and the last step only.
    evaluated = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(evaluated) == [6, 12]
    assert evaluated[12] < evaluated[6]
    assert [r["eval_train_loss"] is not None for r in rows].count(True) == 2
    tokens_per_step = cfg.batch_size * cfg.block_size
    for r in rows:
        assert r["tokens_seen"] == r["step"] * tokens_per_step
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
        assert r["run"] == "tiny" and r["optimizer"] == "adamw"
    assert rows[0]["tokens_per_sec"] is None  # the first step is warm-up
    assert all(r["tokens_per_sec"] > 0 for r in rows[1:])

    # One Parquet part and one TensorBoard file per report, checkpoints at 6 and 12.
    assert sorted(p.name for p in (run_dir / "steps").iterdir()) == [
        "part-000000001-000000006.parquet",
        "part-000000007-000000012.parquet",
    ]
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir()) == [
        "events.out.tfevents.000000000001-000000000006.raygpt",
        "events.out.tfevents.000000000007-000000000012.raygpt",
    ]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [
        "checkpoint_0000006",
        "checkpoint_0000012",
    ]
    # The driver's metadata rides in every part, with the ranks' hardware added.
    metadata = step_metadata(run_dir)
    assert metadata["config"] == {"unit": "tiny"}
    assert [w["device"] for w in metadata["workers"]] == ["cpu"]

    final = result.metrics
    assert final["step"] == 12 and final["done"] is True and final["diverged"] is False
    assert final["val_loss"] == pytest.approx(evaluated[12])
    assert final["best_val_loss"] == pytest.approx(min(evaluated.values()))
    assert final["evaluated"] is True and final["n_layer"] == 1
    out = capfd.readouterr().out
    assert "[raygpt] 1 rank(s) on cpu, float32" in out


def test_divergence_stops_at_the_read_without_a_checkpoint(tmp_path, corpus, capfd):
    # A factor below 1 makes even the first loss count as diverged; the loop sees it at its
    # first read (step 6, the log interval) and ends there with an evaluation and no
    # checkpoint.
    _, result, run_dir = _fit(tmp_path, corpus, "div", divergence_factor=0.5)
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))  # the steps up to the read
    assert rows[-1]["val_loss"] is not None
    assert not list(run_dir.glob("checkpoint_*"))
    final = result.metrics
    assert (final["step"], final["diverged"], final["done"]) == (6, True, True)
    assert "[raygpt] diverged at step 6" in capfd.readouterr().out


def test_eval_only_reports_the_initial_model(tmp_path, corpus):
    _, result, run_dir = _fit(tmp_path, corpus, "evalonly", eval_only=True)
    (row,) = step_rows(run_dir)
    assert row["step"] == 0 and row["train_loss"] is None
    assert row["val_loss"] > 0 and row["eval_train_loss"] > 0
    assert not list(run_dir.glob("checkpoint_*"))
    assert result.metrics["val_loss"] == pytest.approx(row["val_loss"])
    assert result.metrics["done"] is True


def test_a_trials_lines_go_to_its_log_file(tmp_path, corpus, capfd):
    log_path = f"{tmp_path}/results/logs/trial_x.log"
    _fit(
        tmp_path,
        corpus,
        "logged",
        wiring_extra={"log_path": log_path, "echo": False},
        max_steps=6,
        lr_decay_steps=6,
    )
    text = (tmp_path / "results" / "logs" / "trial_x.log").read_text()
    assert "[raygpt] 1 rank(s) on cpu" in text
    assert "step 6" in text  # its progress line
    assert "[raygpt] 1 rank(s) on cpu" not in capfd.readouterr().out  # not on the console
