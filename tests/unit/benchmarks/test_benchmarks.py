"""Every script under benchmarks/, and `python -m raygpt.bench`, run as documented at a
tiny size: a benchmark that no longer runs, or whose figures no longer mean what its
docstring says, fails here rather than when someone re-measures the README.

Each runs as its own process (the documented command, with tiny sizes), on a generated
text file (no download, no Tiny Shakespeare). Here: the scripts that start no Ray; the
ones that need a cluster are in tests/cluster/test_benchmarks.py. nanoGPT's scripts
come from ../shared/reference/nanoGPT, beside the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
from benchmark_runs import BENCH, run
from conftest import REPO

from raygpt.sweep.config import SweepConfig

NANOGPT = REPO.parent / "shared" / "reference" / "nanoGPT"

# The same model as flags, and its schedule, for commands that take a shipped experiment.
TINY_MODEL = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4",
]  # fmt: skip


def test_every_benchmark_script_has_a_smoke_test():
    scripts = sorted(p.name for p in BENCH.glob("*.py"))
    # The smoke tests live beside this one and, for those on Ray, in tests/cluster/.
    smoke = Path(__file__).read_text() + (REPO / "tests/cluster/test_benchmarks.py").read_text()
    tested = sorted(set(re.findall(r'BENCH / "(\w+\.py)"', smoke)))
    assert scripts == tested


def test_step_rows_io(env, tmp_path):
    out = tmp_path / "rows.json"
    run([BENCH / "step_rows_io.py", "--steps", "60", "--report-every", "30", "20",
         "--json", out], env)  # fmt: skip
    results = json.loads(out.read_text())
    assert [(r["report_every"], r["reports"]) for r in results] == [(30, 2), (20, 3)]
    for result in results:
        # The old writer (74685ec's code, from git) and the parts, local and on S3, each
        # hold every row it was handed.
        for side in ("before_local", "after_local", "after_s3"):
            assert result[side]["rows_in_file"] == 60, (side, result[side])
        assert result["before_local"]["driver_cpu_s"] > 0
        assert result["after_local"]["driver_cpu_s"] == 0


def test_val_loss_spread(env, experiment, text_file, tmp_path):
    out = tmp_path / "spread.json"
    stdout = run([BENCH / "val_loss_spread.py", experiment, "--data-file", text_file,
                  "--seeds", "1337,1", "--max-steps", "10", "--json", out], env)  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["seed"], r["sampler"]) for r in rows] == [
        (1337, "raygpt"), (1337, "random"), (1, "raygpt"), (1, "random"),
    ]  # fmt: skip
    for r in rows:
        assert r["steps"] == 10
        for key in ("eval_set", "whole_split", "random20_mean"):
            assert 0 < r[key] < math.log(64), (key, r)  # trained below a uniform guess
    assert rows[0]["whole_split"] != rows[2]["whole_split"]  # the seed matters
    assert "raygpt: whole-split val over 2 seed(s)" in stdout


def test_raygpt_bench_compare(env, text_file, tmp_path):
    out = tmp_path / "bench.json"
    # torch.compile on CPU costs about a minute cold; with dynamo off the compiled variant
    # runs eagerly, and the comparison's own code (variants, table, JSON) still runs.
    run(["-m", "raygpt.bench", "--compare", "--data-file", text_file, *TINY_MODEL,
         "--bench-steps", "2", "--warmup-steps", "1", "--json", out],
        env | {"TORCHDYNAMO_DISABLE": "1"})  # fmt: skip
    result = json.loads(out.read_text())
    assert [v["variant"] for v in result["variants"]] == ["fp32 eager", "fp32 + compile"]
    assert all(len(v["step_ms"]) == 2 and v["tokens_per_sec"] > 0 for v in result["variants"])
    assert result["variants"][0]["speedup"] == 1.0


def test_nanogpt_parity(env, experiment, text_file, tmp_path):
    assert (NANOGPT / "model.py").is_file(), f"nanoGPT's reference copy is missing: {NANOGPT}"
    out, saved = tmp_path / "parity.json", tmp_path / "models"
    # Every check in one run; replay scores the model that train saves first.
    stdout = run([BENCH / "nanogpt_parity.py", "data", "init", "optim", "sampler", "lockstep",
                  "train", "replay", "--experiment", experiment, "--data-file", text_file,
                  "--max-steps", "10", "--steps", "5", "--repeats", "2", "--save-dir", saved,
                  "--checkpoint", saved / "nanogpt-nanogpt-seed1337.pt", "--null-seeds", "3",
                  "--json", out], env)  # fmt: skip
    res = json.loads(out.read_text())
    assert res["data"]["train_equal"] and res["data"]["val_equal"] and res["data"]["vocab_equal"]
    assert res["init"]["all_equal"]
    assert all(g["names_equal"] and g["settings_equal"] for g in res["optim"]["groups"])
    assert res["optim"]["lr_max_abs_diff"] == 0
    assert res["sampler"]["raygpt"]["windows"] == res["sampler"]["nanogpt"]["windows"] == 40
    assert len(res["lockstep"]["rows"]) == 5 and res["lockstep"]["max_abs_dloss"] < 1e-4
    rows = res["train"]["rows"]
    assert [r["runner"] for r in rows] == ["nanogpt", "raygpt"]
    assert all(r["steps"] == 10 and 0 < r["whole"] < math.log(64) for r in rows)
    assert rows[1]["eval_set"] is not None  # the real raygpt.train run, from its checkpoint
    # The saved nanoGPT model, scored again on the whole split: the same number.
    assert res["replay"]["whole"] == pytest.approx(rows[0]["whole"], abs=1e-6)
    assert list(res["replay"]["named"]) == ["1337"] and "== replay" in stdout


def test_vs_nanogpt_cpu(env, text_file, tmp_path):
    assert (NANOGPT / "train.py").is_file(), f"nanoGPT's reference copy is missing: {NANOGPT}"
    out = tmp_path / "vs.json"
    run([BENCH / "vs_nanogpt.py", "cpu", "--data-file", text_file, "--max-steps", "10",
         "--tiny", "--json", out], env)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["steps"] == 10 and result["ratio"] > 0
    assert 0 < result["nanogpt_val"] < math.log(64) and 0 < result["raygpt_val"] < math.log(64)
    # Both sides log at the same interval: nanoGPT's iteration lines at 0, 5, 10 only.
    nano_log = (Path(result["logs"]) / "nanogpt.log").read_text()
    assert [int(i) for i in re.findall(r"^iter (\d+):", nano_log, re.M)] == [0, 5, 10]
    ray_log = (Path(result["logs"]) / "raygpt.log").read_text()
    assert "running in this process" in ray_log and "done: step 10" in ray_log


def test_train_vs_plain(env, experiment, text_file, tmp_path):
    out = tmp_path / "vs_plain.json"
    # Ray Train's local mode: the script's own code is the same as for a worker group
    # (its default), which costs ~15 s to start on 2 cores.
    run([BENCH / "train_vs_plain.py", experiment, "--data-file", text_file, "--max-steps",
         "10", "--cpus-per-worker", "1", "--in-process", "true", "--json", out], env)  # fmt: skip
    result = json.loads(out.read_text())
    plain, ray = result["plain"], result["ray"]
    assert result["config"]["in_process"] == "true"
    # Same model, batches and threads: raygpt.train's losses are the plain loop's.
    assert sorted(int(s) for s in ray["val_losses"]) == [5, 10]
    assert ray["val_losses"] == pytest.approx(plain["val_losses"], abs=1e-5)
    assert ray["step_ms_median"] > 0 and result["ratio"] > 0


def test_service_load(env, tmp_path):
    out = tmp_path / "load.json"
    stdout = run([BENCH / "service_load.py", "--sweeps", "2", "--trials", "40",
                  "--requests", "3", "--json", out], env, timeout=120)  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["sweeps"], result["trials"], result["requests"]) == (2, 40, 3)
    [(name, db)] = result["databases"].items()  # no --db: the fresh SQLite file alone
    assert name == "sqlite" and (db["sweeps"], db["trials"]) == (2, 40)
    # What the answers held: every sweep listed, a sweep's 20 trials on its page, and the
    # trials the filter selects (adamw at 11M parameters: 7 of the second sweep's 20).
    assert db["sweeps_on_list_page"] == db["sweeps_listed"] == 2
    assert db["trial_rows_on_last_page"] == 20
    assert db["trials_matched"] == db["expected_trials_matched"] == 7
    routes = ["GET /", "GET /sweeps", "GET /sweeps/{id}/page", "GET /trials"]
    assert list(db["routes"]) == routes
    for route, t in db["routes"].items():
        assert t["n"] == 3, route
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["p95_ms"] <= t["max_ms"], (route, t)
        assert t["target_ms"] == {"GET /": 200, "GET /trials": 100}.get(route)
        [line] = [line for line in stdout.splitlines() if line.split()[:2] == route.split()]
        assert "median" in line and "p95" in line
        assert (f"target < {t['target_ms']:.0f} ms" if t["target_ms"] else "no target") in line


def test_fifo_runs_rung_cooldowns_only_where_grace_steps_names_rungs():
    # ASHA/HyperBand compare at rungs: always. FIFO: only with --grace-steps (what
    # benchmarks/asha_bias.py measures at). PBT has no rungs.
    assert SweepConfig(scheduler="asha").trial_rung_cooldown() == 0.2
    assert SweepConfig(scheduler="hyperband", rung_cooldown=0.1).trial_rung_cooldown() == 0.1
    assert SweepConfig(scheduler="fifo").trial_rung_cooldown() == 0.0
    assert SweepConfig(scheduler="fifo", grace_steps=250).trial_rung_cooldown() == 0.2
    assert (
        SweepConfig(scheduler="fifo", grace_steps=250, rung_cooldown=0).trial_rung_cooldown() == 0
    )
    assert SweepConfig(scheduler="pbt", grace_steps=250).trial_rung_cooldown() == 0.0


def test_checkpoint_upload_warms_up_then_alternates_the_first_mode():
    spec = importlib.util.spec_from_file_location(
        "checkpoint_upload", BENCH / "checkpoint_upload.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.schedule(["s3", "local"], 2, warmup=True) == [
        ("s3", None, "sync"), ("s3", 0, "sync"), ("s3", 0, "async"),
        ("s3", 1, "async"), ("s3", 1, "sync"),
        ("local", None, "sync"), ("local", 0, "sync"), ("local", 0, "async"),
        ("local", 1, "async"), ("local", 1, "sync"),
    ]  # fmt: skip
    assert module.schedule(["local"], 1, warmup=False) == [
        ("local", 0, "sync"), ("local", 0, "async"),
    ]  # fmt: skip
