"""raygpt.report on synthetic sweep folders: summary, plots, CLI (no Ray, fast)."""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_main, run_module

from raygpt import results
from raygpt.errors import UserError
from raygpt.report import driver as report_driver
from raygpt.report import plots, tables
from raygpt.report import summary as report_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (trial_id, optimizer, lr, status, best_val_loss, steps, momentum, mfu known)
TRIALS = [
    ("t00", "adamw", 1e-4, "completed", 1.60, 60, None, True),
    ("t01", "adamw", 3e-4, "completed", 1.45, 60, None, True),
    ("t02", "adamw", 1e-3, "completed", 1.40, 60, None, True),
    ("t03", "adamw", 3e-3, "stopped_early", 1.55, 20, None, True),
    # Diverged with a *lower* recorded number than anyone: must never win.
    ("t04", "adamw", 1e-2, "diverged", 0.50, 15, None, True),
    ("t05", "sgd", 1e-2, "completed", 2.10, 60, None, False),
    ("t06", "sgd", 3e-2, "completed", 1.90, 60, None, False),
    ("t07", "sgd", 1e-1, "diverged", math.inf, 12, None, False),
    ("t08", "sgd", 3e-1, "diverged", math.nan, 5, None, False),
    ("t09", "sgd", 1.0, "error", None, 0, None, False),
    ("t10", "momentum", 1e-2, "completed", 1.80, 60, 0.9, False),
    ("t11", "momentum", 3e-3, "stopped_early", 1.70, 20, 0.95, False),
    ("t12", "momentum", 3e-2, "running", 1.75, 30, 0.8, False),
]
TOKENS_PER_STEP = 1024
EVAL_INTERVAL = 10


def _step_rows(trial_id, optimizer, lr, status, best, n_steps, mfu_known, run="sweep"):
    rows = []
    for step in range(1, n_steps + 1):
        frac = step / max(n_steps, 1)
        target = best if (best is not None and math.isfinite(best)) else 2.5
        train = 4.2 - (4.2 - target) * frac + 0.03 * math.sin(step)
        if status == "diverged" and step >= n_steps - 2:
            train = [50.0, 1e4, math.inf][step - n_steps + 2]
        val = eval_train = None
        if step % EVAL_INTERVAL == 0 or step == n_steps:
            val = train + 0.05
            eval_train = train
            if status == "diverged" and step == n_steps:
                val = math.nan
        tps = 20000.0 + 500 * math.cos(step) if step > 1 else 4000.0
        rows.append(
            {
                "run": run,
                "trial_id": trial_id,
                "optimizer": optimizer,
                "learning_rate": lr,
                "step": step,
                "tokens_seen": step * TOKENS_PER_STEP,
                "train_loss": train,
                "val_loss": val,
                "eval_train_loss": eval_train,
                "lr": lr * min(1.0, step / 10),
                "grad_norm": 1.0,
                "step_time_ms": 1000 * TOKENS_PER_STEP / tps,
                "tokens_per_sec": tps,
                "mfu": 0.3 + 0.01 * math.sin(step) if mfu_known else None,
            }
        )
    return rows


def _trial_row(trial_id, optimizer, lr, status, best, n_steps, momentum, _mfu_known):
    return {
        "trial_id": trial_id,
        "optimizer": optimizer,
        "learning_rate": lr,
        "momentum": momentum,
        "params": json.dumps({"optimizer": optimizer, "learning_rate": lr}),
        "status": status,
        "error": "RuntimeError: boom" if status == "error" else None,
        "steps": n_steps,
        "best_val_loss": best,
        "final_train_loss": best,
        "final_val_loss": best,
        "wall_seconds": 10.0 if status != "error" else 1.0,
        "train_seconds": 5.0 if status != "error" else 0.0,
        "tokens": n_steps * TOKENS_PER_STEP,
        "mean_tokens_per_sec": 20000.0 if status != "error" else None,
        "mean_mfu": 0.3 if _mfu_known else None,
        "checkpoint_path": None,
    }


def _all_steps(specs=TRIALS):
    rows = []
    for t in specs:
        trial_id, optimizer, lr, status, best, n_steps, _m, mfu_known = t
        if status != "error":
            rows += _step_rows(trial_id, optimizer, lr, status, best, n_steps, mfu_known)
    return pa.Table.from_pylist(rows, schema=results.STEP_SCHEMA)


def _write_sweep(folder: Path, trials: bool = True, steps: bool = True, specs=TRIALS) -> Path:
    meta = {"sweep": {"name": "lr-sweep-test"}, "config": {"max_steps": 60}}
    if trials:
        table = pa.Table.from_pylist([_trial_row(*t) for t in specs], schema=results.TRIAL_SCHEMA)
        _write(results.with_metadata(table, meta), folder / "trials.parquet")
    if steps:
        _write_steps(folder, results.with_metadata(_all_steps(specs), meta))
    return folder


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _write_steps(folder: Path, table: pa.Table) -> None:
    """Step rows as the trainer leaves them: per-trial Parquet parts under runs/<id>/steps/."""
    trial_ids = sorted(set(table["trial_id"].to_pylist()))
    for trial_id in trial_ids:
        rows = table.filter(pa.compute.equal(table["trial_id"], trial_id))
        run = folder / "runs" / trial_id if trial_id else folder
        for first in range(0, len(rows), 25):  # several parts per trial, as at each report
            chunk = rows.slice(first, 25)
            steps = chunk["step"].to_pylist()
            _write(chunk, run / "steps" / results.part_name(min(steps), max(steps)))


@pytest.fixture
def sweep(tmp_path) -> Path:
    return _write_sweep(tmp_path / "lr-sweep-test")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _assert_png(path: Path) -> None:
    assert path.exists(), path
    _png_size(path)
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"


def _run_cli(*args) -> subprocess.CompletedProcess:
    return run_module("raygpt.report", *args)


# --------------------------------------------------------------------------- summary


def _val_at(steps, trial_id, step):
    return next(
        r["val_loss"] for r in steps.to_pylist() if r["trial_id"] == trial_id and r["step"] == step
    )


def test_summary_best_lr_per_optimizer_at_equal_budget(sweep):
    trials, steps, metadata = tables.load(sweep)
    summary = report_summary.summarize(trials, steps)
    by_opt = {e["optimizer"]: e for e in summary["optimizers"]}
    assert by_opt["adamw"]["best_learning_rate"] == pytest.approx(1e-3)  # not the diverged 1e-2
    # The val at the budget every compared trial reached (step 60), not a best-ever value.
    assert by_opt["adamw"]["best_val_loss"] == pytest.approx(_val_at(steps, "t02", 60))
    assert by_opt["adamw"]["budget"] == 60
    assert by_opt["sgd"]["best_learning_rate"] == pytest.approx(3e-2)
    # momentum's lowest number came from a trial ASHA stopped at step 20 (lr 3e-3): not
    # comparable with the completed 1e-2 at step 60, so the completed one is the answer.
    assert by_opt["momentum"]["best_learning_rate"] == pytest.approx(1e-2)
    assert by_opt["momentum"]["best_momentum"] == pytest.approx(0.9)
    assert [e["optimizer"] for e in summary["optimizers"]] == ["adamw", "momentum", "sgd"]
    best = summary["best"]
    assert (best["optimizer"], best["learning_rate"]) == ("adamw", pytest.approx(1e-3))
    assert best["val_loss"] == pytest.approx(_val_at(steps, "t02", 60))
    assert best["step"] == 60
    assert metadata["name"] == "lr-sweep-test"
    # Every budget's best: at step 20 the stopped trials compete with the others' step 20.
    budgets = {b["step"]: b for b in summary["comparison"]["budgets"]}
    assert set(budgets) >= {20, 60}
    at_20 = [
        _val_at(steps, t[0], 20)
        for t in TRIALS
        if t[3] in ("completed", "stopped_early", "running")
    ]
    assert budgets[20]["best"]["mean"] == pytest.approx(min(at_20))


def test_best_lr_at_the_end_of_the_tried_range_is_flagged(tmp_path):
    specs = [
        ("t00", "momentum", 1e-3, "completed", 1.60, 60, 0.9, False),
        ("t01", "momentum", 3e-3, "completed", 1.70, 60, 0.9, False),
        ("t02", "momentum", 1e-2, "completed", 1.80, 60, 0.9, False),
    ]
    summary = report_summary.summarize(*tables.load(_write_sweep(tmp_path / "a", specs=specs))[:2])
    assert summary["optimizers"][0]["best_at_edge"] == "lowest"
    lines = report_summary.format_summary(summary).splitlines()
    flagged = [ln for ln in lines if ln.startswith("range:")]
    assert flagged == [
        "range:    momentum's best lr 0.001 is the lowest it tried; the optimum may lie "
        "below: try --lr-range momentum=0.0001:0.01"
    ]


def test_best_lr_at_the_top_is_flagged_unless_a_larger_one_diverged(tmp_path):
    top = [t for t in TRIALS if t[1] == "adamw" and t[3] != "diverged"]
    top.append(("t20", "adamw", 1e-2, "completed", 1.30, 60, None, True))
    summary = report_summary.summarize(*tables.load(_write_sweep(tmp_path / "a", specs=top))[:2])
    assert summary["optimizers"][0]["best_at_edge"] == "highest"
    assert "the optimum may lie above" in report_summary.format_summary(summary)
    bracketed = [*top, ("t21", "adamw", 3e-2, "diverged", math.nan, 5, None, True)]
    summary = report_summary.summarize(
        *tables.load(_write_sweep(tmp_path / "b", specs=bracketed))[:2]
    )
    assert summary["optimizers"][0]["best_at_edge"] is None


def test_summary_status_counts_and_compute(sweep):
    trials, steps, _ = tables.load(sweep)
    summary = report_summary.summarize(trials, steps)
    assert summary["trials"] == len(TRIALS)
    assert summary["status_counts"] == {
        "completed": 6,
        "stopped_early": 2,
        "diverged": 3,
        "error": 1,
        "running": 1,
    }
    by_opt = {e["optimizer"]: e for e in summary["optimizers"]}
    assert by_opt["sgd"]["status_counts"] == {"completed": 2, "diverged": 2, "error": 1}
    compute = summary["compute"]
    expected_steps = sum(t[5] for t in TRIALS if t[3] != "error")
    assert compute["total_steps"] == expected_steps == len(steps)
    assert compute["total_tokens"] == expected_steps * TOKENS_PER_STEP
    expected_seconds = sum(steps.column("step_time_ms").to_pylist()) / 1000
    assert compute["train_seconds"] == pytest.approx(expected_seconds)
    assert compute["wall_seconds"] == pytest.approx(10.0 * 12 + 1.0)
    assert 15_000 < compute["mean_tokens_per_sec"] < 21_000
    assert compute["mean_mfu"] == pytest.approx(0.3, abs=0.01)  # only adamw's rows have MFU


def test_summary_without_steps_uses_trials_columns(sweep):
    trials, _, _ = tables.load(sweep)
    compute = report_summary.summarize(trials, None)["compute"]
    assert compute["total_steps"] == sum(t[5] for t in TRIALS)
    assert compute["train_seconds"] == pytest.approx(5.0 * 12)
    assert compute["mean_mfu"] == pytest.approx(0.3)


def test_mfu_null_everywhere_is_reported_as_na(tmp_path):
    specs = [t for t in TRIALS if t[1] == "sgd"]
    folder = _write_sweep(tmp_path / "cpu-sweep", specs=specs)
    summary = report_summary.summarize(*tables.load(folder)[:2])
    assert summary["compute"]["mean_mfu"] is None
    assert "mean MFU n/a" in report_summary.format_summary(summary)


def test_format_summary_table(sweep):
    trials, steps, metadata = tables.load(sweep)
    text = report_summary.format_summary(
        report_summary.summarize(trials, steps, name=metadata["name"])
    )
    print(text)
    lines = text.splitlines()
    assert "lr-sweep-test" in lines[0]
    table = [ln for ln in lines if ln.split() and ln.split()[0] in ("adamw", "sgd", "momentum")]
    assert [ln.split()[0] for ln in table] == ["adamw", "momentum", "sgd"]  # sorted by best loss
    assert table[0].split()[1] == "0.001"
    assert f"{_val_at(steps, 't02', 60):.4f}" in table[0]
    assert any(ln.startswith("best:") and "adamw at lr 0.001" in ln for ln in lines)
    assert any(ln.startswith("status:") and "3 diverged" in ln for ln in lines)
    assert any(ln.startswith("compute:") and f"{len(steps):,} steps" in ln for ln in lines)
    # Fixed width: the header and every optimizer row line up on the last column.
    header = next(ln for ln in lines if ln.startswith("optimizer"))
    assert all(len(ln) == len(header) for ln in table)


# --------------------------------------------------------------------------- plots


def test_render_writes_valid_pngs(sweep, tmp_path):
    out = tmp_path / "plots"
    text, pngs = report_driver.render(sweep, out)
    assert [p.name for p in pngs] == list(plots.PLOT_FILES)
    for png in pngs:
        assert png.parent == out
        _assert_png(png)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files behind
    assert "adamw" in text


def test_render_defaults_to_sweep_dir(sweep):
    _, pngs = report_driver.render(sweep)
    assert {p.parent for p in pngs} == {sweep}
    for png in pngs:
        _assert_png(png)


def test_throughput_mfu_panel_only_when_known(tmp_path):
    with_mfu = plots.plot_throughput(_all_steps(), tmp_path / "with.png")
    cpu_only = _all_steps([t for t in TRIALS if not t[7]])
    without = plots.plot_throughput(cpu_only, tmp_path / "without.png")
    for png in (with_mfu, without):
        _assert_png(png)
    assert _png_size(with_mfu)[1] > _png_size(without)[1] * 1.3  # a second panel


def test_plots_with_huge_and_missing_values(tmp_path):
    specs = [
        ("a", "adamw", 1e-3, "completed", 1.5, 30, None, True),
        ("b", "adamw", 1e-2, "completed", 1e6, 30, None, True),  # absurd but "completed"
        ("c", "adamw", 1e-1, "diverged", math.inf, 10, None, True),
        ("d", "sgd", 1e-1, "diverged", math.nan, 10, None, False),  # only diverged points
    ]
    trials = pa.Table.from_pylist([_trial_row(*t) for t in specs], schema=results.TRIAL_SCHEMA)
    _assert_png(plots.plot_lr_sensitivity(trials, tmp_path / "lr.png", "huge"))
    _assert_png(plots.plot_loss_curves(_all_steps(specs), tmp_path / "loss.png", "huge"))


def test_a_single_point_sets_the_learning_rate_axis_without_a_warning(tmp_path, recwarn):
    # One finished trial (its optimizer's only point) and one that errored, as a sweep
    # whose sgd trials all failed leaves them: the axis spans both rates with padding, and
    # matplotlib never autoscales to the lone point's zero-width range first.
    specs = [
        ("a", "adamw", 1e-4, "completed", 1.5, 20, None, False),
        ("b", "sgd", 1e-3, "error", None, 2, None, False),
    ]
    trials = pa.Table.from_pylist([_trial_row(*t) for t in specs], schema=results.TRIAL_SCHEMA)
    _assert_png(plots.plot_lr_sensitivity(trials, tmp_path / "lr.png", "one", _all_steps(specs)))
    assert [str(w.message) for w in recwarn] == []


def test_empty_tables(tmp_path):
    folder = tmp_path / "fresh"
    _write(results.TRIAL_SCHEMA.empty_table(), folder / "trials.parquet")
    _write(results.STEP_SCHEMA.empty_table(), folder / "steps" / results.part_name(0, 0))
    text, pngs = report_driver.render(folder)
    assert "no trials yet" in text
    assert pngs == []


# --------------------------------------------------------------------------- partial folders


def test_train_run_folder_with_only_steps(tmp_path):
    folder = tmp_path / "shakespeare-run"
    rows = _step_rows("", "adamw", 6e-4, "completed", 1.5, 40, False, run="shakespeare-run")
    table = pa.Table.from_pylist(rows, schema=results.STEP_SCHEMA)
    meta = {"config": {"name": "shakespeare-run", "max_steps": 40, "divergence_factor": 3.0}}
    _write_steps(folder, results.with_metadata(table, meta))

    trials, steps, metadata = tables.load(folder)
    assert len(trials) == 1 and len(steps) == 40
    row = trials.to_pylist()[0]
    assert row["trial_id"] == "" and row["status"] == "completed" and row["steps"] == 40
    assert row["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows if r["val_loss"]))
    assert metadata["name"] == "shakespeare-run"

    text, pngs = report_driver.render(folder)
    assert "adamw at lr 0.0006" in text
    assert [p.name for p in pngs] == ["loss_curves.png", "throughput.png"]
    for png in pngs:
        _assert_png(png)


def test_derived_trials_flag_divergence_and_running(tmp_path):
    rows = _step_rows("x", "sgd", 1.0, "diverged", None, 12, False)
    rows += _step_rows("y", "sgd", 0.1, "running", 1.9, 25, False)
    table = pa.Table.from_pylist(rows, schema=results.STEP_SCHEMA)
    derived = {
        r["trial_id"]: r
        for r in tables.derive_trials(table, {"config": {"max_steps": 60}}).to_pylist()
    }
    assert derived["x"]["status"] == "diverged"
    assert derived["y"]["status"] == "running"
    assert derived["y"]["tokens"] == 25 * TOKENS_PER_STEP


@pytest.mark.parametrize("missing", ["trials", "steps"])
def test_sweep_with_one_file_missing(tmp_path, missing):
    folder = _write_sweep(tmp_path / "half", trials=missing != "trials", steps=missing != "steps")
    trials, steps, _ = tables.load(folder)
    assert (steps is None) == (missing == "steps")
    summary = report_summary.summarize(trials, steps)
    by_opt = {e["optimizer"]: e for e in summary["optimizers"]}
    assert by_opt["adamw"]["best_learning_rate"] == pytest.approx(1e-3)
    assert by_opt["sgd"]["best_learning_rate"] == pytest.approx(3e-2)
    _, pngs = report_driver.render(folder, tmp_path / "out")
    expected = {"trials": list(plots.PLOT_FILES), "steps": ["lr_sensitivity.png"]}[missing]
    assert [p.name for p in pngs] == expected
    for png in pngs:
        _assert_png(png)


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"no such folder: .*nowhere.*<storage>/<name>"):
        tables.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no trials.parquet or step parts in .*empty"):
        tables.load(tmp_path / "empty")


# --------------------------------------------------------------------------- CLI


def test_cli_prints_best_lr_and_pngs(sweep, tmp_path):
    proc = _run_cli(sweep, "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    assert "best:     adamw at lr 0.001 " in proc.stdout
    for name in plots.PLOT_FILES:
        assert f"wrote {tmp_path / 'cli' / name}" in proc.stdout
        _assert_png(tmp_path / "cli" / name)


def test_cli_no_plots(sweep, capfd):
    proc = run_main(report_driver.main, sweep, "--no-plots", capfd=capfd)
    assert proc.returncode == 0, proc.stderr
    assert "adamw at lr 0.001" in proc.stdout and "wrote" not in proc.stdout
    assert not list(sweep.glob("*.png"))


def test_cli_missing_dir_exits_2(tmp_path, capfd):
    proc = run_main(report_driver.main, tmp_path / "no-such-sweep", capfd=capfd)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "no-such-sweep" in lines[0]
    assert proc.stdout == ""
