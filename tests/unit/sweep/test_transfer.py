"""The transfer sweep without Ray: its plan, its analysis and files from synthetic proxy
folders, its orchestration with a stand-in sweep runner, and bad input at the CLI. One
real small transfer on the embedded corpus is benchmarks/lr_transfer.py's smoke test, in
tests/cluster/test_benchmarks.py.

Synthetic proxies follow a known law: at width w the best lr is BASE * (w / 16)^SLOPE,
and loss = 2 + 0.1 (ln lr - ln best)^2 + noise per seed, on one factor-2 grid.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, one_line, write_trials_parquet

from raygpt import results, storage
from raygpt.errors import UserError
from raygpt.model import sizes
from raygpt.report import compute
from raygpt.report.transfer import analysis
from raygpt.report.transfer import outputs as transfer_outputs
from raygpt.report.transfer import plan as transfer_plan
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import transfer

PNG = b"\x89PNG\r\n\x1a\n"


VOCAB = 65


BASE, SLOPE = 3e-3, -1.0


GRID = BASE * 2.0 ** np.arange(-6, 4)


CONFIG = {
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 16,
    "batch_size": 4,
    "num_workers": 1,
    "tokens_per_step": None,
    "max_steps": 20,
    "bias": False,
    "parametrization": "sp",
}


SECONDS_PER_FLOP = {16: 4e-9, 32: 2e-9, 48: 1e-9}  # small models use the device worse


TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "20", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "20", "--compile", "false",
]  # fmt: skip


def best_at(width: int) -> float:
    return BASE * (width / 16) ** SLOPE


def proxy_rows(width: int, rng, optimizer="adamw", seeds=2, noise=0.005, n_layer=1) -> list[dict]:
    n = sizes.non_embedding_params(n_layer, width, VOCAB)
    per_token = compute.flops_per_token(n, n_layer, 2, width, 16)
    rows = []
    for lr in GRID:
        for seed in range(seeds):
            loss = 2 + 0.1 * math.log(lr / best_at(width)) ** 2 + rng.normal(0, noise)
            params = {"optimizer": optimizer, "learning_rate": float(lr), "seed": seed}
            flops = per_token * 20 * 64.0
            rows.append(
                {name: None for name in results.TRIAL_SCHEMA.names}
                | {
                    "trial_id": f"{optimizer}-{width}-{lr:.3g}-{seed}",
                    "optimizer": optimizer,
                    "learning_rate": float(lr),
                    "params": json.dumps(params),
                    "status": "completed",
                    "steps": 20,
                    "final_val_loss": loss,
                    "best_val_loss": loss,
                    "tokens": 20 * 64,
                    "seed": seed,
                    "config_key": json.dumps({"learning_rate": float(lr)}),
                    "n_params": n,
                    "n_layer": n_layer,
                    "n_embd": width,
                    "parametrization": "sp",
                    "flops": flops,
                    "device_seconds": flops * SECONDS_PER_FLOP.get(width, 1e-9),
                    "gpu_hours": 0.0,
                }
            )
    return rows


def write_trials(folder: Path, rows: list[dict], config: dict | None = None) -> Path:
    meta = {
        "sweep": {"name": folder.name},
        "config": config or CONFIG,
        "data": {"dataset": "pydocs_char", "vocab_size": VOCAB},
    }
    return write_trials_parquet(folder, rows, meta)


def test_axes_and_target_parse():
    assert transfer_plan.parse_axis("n_embd=128,64, 256") == ("n_embd", [64, 128, 256])
    assert transfer_plan.parse_target("n_embd=768,n_layer=12") == {"n_embd": 768, "n_layer": 12}
    for bad, fragment in [
        ("width=1,2", "'width' is not a model size key; vary one of n_embd, n_layer, n_head"),
        ("n_embd=64", "a trend needs at least 2 values"),
        ("n_embd=64,64,128", "repeats a value"),
        ("n_embd=64,abc", "'abc' must be a positive whole number"),
        ("n_embd", "is not KEY=a,b,c"),
    ]:
        with pytest.raises(UserError) as err:
            transfer_plan.parse_axis(bad)
        assert fragment in one_line(err)
    for bad in ("n_embd", "lr=3", "n_embd=0", "n_embd=1,n_embd=2", ""):
        with pytest.raises(UserError):
            transfer_plan.parse_target(bad)


def test_two_axes_share_the_base_point():
    base = {"n_embd": 128, "n_layer": 2, "n_head": 4}
    sizes = transfer_plan.proxy_sizes(base, [("n_embd", [64, 128, 256]), ("n_layer", [2, 4, 8])])
    assert [name for name, _ in sizes] == [
        "n_embd=64,n_layer=2",
        "n_embd=128,n_layer=2",
        "n_embd=256,n_layer=2",
        "n_embd=128,n_layer=4",
        "n_embd=128,n_layer=8",
    ]
    assert sizes[3][1] == {"n_embd": 128, "n_layer": 4, "n_head": 4}
    one = transfer_plan.proxy_sizes(base, [("n_embd", [64, 256])])
    assert [n for n, _ in one] == ["n_embd=64", "n_embd=256"]
    assert transfer_plan.target_size(base, [("n_embd", [64])], {"n_layer": 12}) == {
        "n_embd": 128,
        "n_layer": 12,
    }


def test_plan_refusals_are_one_line():
    base = {"n_embd": 128, "n_layer": 2, "n_head": 4}
    cases = [
        ([("n_embd", [64, 128])], {"n_embd": 32}, "target n_embd=32 is smaller than the proxies"),
        ([("n_embd", [64, 130])], {"n_embd": 256}, "n_embd=130 is not divisible by n_head=4"),
        ([("n_embd", [64, 128])], {"n_embd": 770}, "--target: n_embd=770 is not divisible"),
        ([("n_layer", [2, 4])], {"n_layer": 1}, "target n_layer=1 is smaller"),
    ]
    for axes, target, fragment in cases:
        with pytest.raises(UserError) as err:
            transfer_plan.check_plan(base, axes, target)
        assert fragment in one_line(err)


def test_proxy_and_confirm_configs(tmp_path):
    sweep, train = sweep_cli.configs_from_argv(
        [*TINY, "--optimizers", "adamw", "--search", "grid", "--grid-points", "3", "--seeds", "2",
         "--search-space", "weight_decay=0.0,0.1",
         "--transfer", "n_embd=16,32,48", "--target", "n_embd=96", "--name", "t",
         "--storage-path", str(tmp_path)]
    )  # fmt: skip
    assert sweep.scheduler == "fifo"  # the transfer's default: every trial to the end
    store = storage.resolve(str(tmp_path), check=False)
    proxies = transfer.proxy_configs(sweep, train, store, "t")
    assert [p[0] for p in proxies] == ["n_embd=16", "n_embd=32", "n_embd=48"]
    _, size, proxy_sweep, proxy_train = proxies[2]
    assert proxy_train.n_embd == 48 == size["n_embd"] and proxy_train.n_layer == 1
    assert proxy_sweep.name == "n_embd=48"
    assert proxy_sweep.storage_path == f"{tmp_path}/t/proxies"
    assert (proxy_sweep.search, proxy_sweep.grid_points, proxy_sweep.seeds) == ("grid", 3, 2)
    assert proxy_sweep.search_space == ["weight_decay=0.0,0.1"] and not proxy_sweep.transfer
    confirm, target_train = transfer.confirm_configs(sweep, train, store, "t", {"adamw": 4e-3})
    assert target_train.n_embd == 96 and confirm.name == "confirm-target"
    assert confirm.storage_path == f"{tmp_path}/t" and confirm.search_space == []
    from raygpt.sweep.search import grid_points

    lrs = [p["learning_rate"] for p in grid_points(["adamw"], confirm.lr_ranges(), 3)]
    assert lrs == pytest.approx([2e-3, 4e-3, 8e-3], rel=1e-12)


def test_sub_uri_keeps_an_object_stores_options():
    s3 = storage.Storage(
        uri="s3://bucket/prefix?endpoint_override=http%3A//127.0.0.1:9000",
        fs=None,
        root="bucket/prefix",
    )
    assert transfer.sub_uri(s3, "t", "proxies") == (
        "s3://bucket/prefix/t/proxies?endpoint_override=http%3A//127.0.0.1:9000"
    )


@pytest.fixture
def transfer_dir(tmp_path) -> Path:
    """A transfer folder whose three proxies (widths 16, 32, 48) swept adamw over seeds."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "t"
    for w in (16, 32, 48):
        write_trials(folder / "proxies" / f"n_embd={w}", proxy_rows(w, rng))
    return folder


SIZES = [(f"n_embd={w}", {"n_embd": w, "n_layer": 1, "n_head": 2}) for w in (16, 32, 48)]


def analyse(folder: Path, target=None) -> analysis.Transfer:
    store = storage.resolve(str(folder), check=False)
    target = target or {"n_embd": 128}
    return analysis.analyse(analysis.read_proxies(store, SIZES), target, ["n_embd"])


def test_analysis_predicts_the_target_with_its_cost(transfer_dir):
    found = analyse(transfer_dir)
    t = found.optimizers["adamw"]
    assert [f.in_trend for f in t.fits] == [True, True, True]
    assert t.trend.slopes["n_embd"] == pytest.approx(SLOPE, abs=0.1)
    assert t.trend.low < best_at(128) < t.trend.high
    # The proxies' cost, and a direct 10-point sweep over 2 seeds at the target at the
    # largest proxy's seconds per FLOP.
    rows = [r for w in (16, 32, 48) for r in proxy_rows(w, np.random.default_rng(0))]
    assert t.device_seconds == pytest.approx(sum(r["device_seconds"] for r in rows))
    n = sizes.non_embedding_params(1, 128, VOCAB)
    per_trial = compute.flops_per_token(n, 1, 2, 128, 16) * 20 * 64
    assert t.direct_device_seconds == pytest.approx(1e-9 * per_trial * 20)
    assert (t.direct_trials, t.direct_points) == (20, 10)
    (line, *details) = analysis.lines(found)
    assert re.fullmatch(
        r"adamw: lr \d\.\de-\d \(90% interval \d\.\de-\d to \d\.\de-\d\) for n_embd=128, from 3 "
        r"proxies; cost [\d.e-]+ device-hours vs ~[\d.e-]+ for a direct 10-point sweep over 2 "
        r"seeds at the target",
        line,
    ), line
    assert details[0].startswith("  n_embd=16: lr ") and details[3].startswith("  trend: ")


def test_the_line_prices_gpu_hours(transfer_dir):
    t = analyse(transfer_dir).optimizers["adamw"]
    hours, direct = t.device_seconds / 3600, t.direct_device_seconds / 3600
    line = analysis.summary_line(t, "n_embd=128", gpu_hour_price=2.0, on_gpu=True)
    assert line.endswith(
        f"at the target ({hours * 2:,.2f} vs ~{direct * 2:,.2f} at 2 per GPU-hour)"
    )
    assert "per GPU-hour" not in analysis.summary_line(t, "n_embd=128", 2.0, on_gpu=False)


def test_transfer_parquet_and_png(transfer_dir):
    found = analyse(transfer_dir)
    store = storage.resolve(str(transfer_dir), check=False)
    written = transfer_outputs.write_outputs(store, found, name="t")
    assert written == [transfer_dir / "transfer.parquet", transfer_dir / "transfer.png"]
    assert (transfer_dir / "transfer.png").read_bytes()[:8] == PNG
    table = pq.read_table(transfer_dir / "transfer.parquet")
    assert table.schema.names == transfer_outputs.TRANSFER_SCHEMA.names
    rows = table.to_pylist()
    proxies = [r for r in rows if r["kind"] == "proxy"]
    assert [r["n_embd"] for r in proxies] == [16, 32, 48]
    assert all(r["in_trend"] and r["low"] < r["lr"] < r["high"] for r in proxies)
    assert proxies[0]["n_params"] == sizes.non_embedding_params(1, 16, VOCAB)
    assert proxies[0]["folder"] == str(transfer_dir / "proxies" / "n_embd=16")
    (pred,) = [r for r in rows if r["kind"] == "prediction"]
    assert pred["n_embd"] == 128 and pred["n_layer"] == 1 and pred["parametrization"] == "sp"
    assert pred["low"] < best_at(128) < pred["high"] and pred["direct_trials"] == 20
    assert json.loads(pred["slopes"])["n_embd"][0] == pytest.approx(SLOPE, abs=0.1)
    footer = results.decode_metadata(table.schema)["transfer"]
    assert footer["target"] == {"n_embd": 128} and set(footer["proxies"]) == {s for s, _ in SIZES}


def test_a_size_at_the_grids_edge_and_an_optimizer_without_a_trend(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "t"
    for w in (16, 32, 48):
        rows = proxy_rows(w, rng)
        if w == 48:  # only lrs above its best: the lowest loss at the grid's bottom
            rows = [r for r in rows if r["learning_rate"] > best_at(48) * 1.5]
        rows += [r for r in proxy_rows(w, rng, optimizer="sgd") if r["seed"] == 0][:2]
        write_trials(folder / "proxies" / f"n_embd={w}", rows)
    found = analyse(folder)
    adamw, sgd = found.optimizers["adamw"], found.optimizers["sgd"]
    assert [f.in_trend for f in adamw.fits] == [True, True, False]
    assert adamw.fits[2].best.edge == "lowest" and len(adamw.trend.sizes) == 2
    assert sgd.trend is None and "2 learning rate(s) with a finite loss" in sgd.reason
    text = analysis.lines(found)
    assert any(line.startswith("sgd: no prediction for n_embd=128: ") for line in text)
    store = storage.resolve(str(folder), check=False)
    transfer_outputs.write_outputs(store, found)
    rows = pq.read_table(folder / "transfer.parquet").to_pylist()
    (edge,) = [
        r for r in rows if r["kind"] == "proxy" and not r["in_trend"] and r["optimizer"] == "adamw"
    ]
    assert edge["edge"] == "lowest" and edge["high"] is not None and edge["low"] is None
    (none,) = [r for r in rows if r["kind"] == "prediction" and r["optimizer"] == "sgd"]
    assert none["lr"] is None and "finite loss" in none["notes"]


def test_confirm_says_whether_the_prediction_was_best():
    rng = np.random.default_rng(2)
    rows = [
        r
        for r in proxy_rows(128, rng)
        if any(math.isclose(r["learning_rate"], GRID[k]) for k in (5, 6, 7))
    ]
    assert analysis.confirm_points(rows, GRID[6], "adamw")[1]["multiple"] == 1.0
    t = analysis.OptimizerTransfer("adamw", [], None, None)
    t.confirm = analysis.confirm_points(rows, GRID[6], "adamw")  # best of 128 is GRID[5]
    assert [c["n"] for c in t.confirm] == [2, 2, 2] and t.confirmed is False
    t.confirm = analysis.confirm_points(rows, GRID[5] * 2 / 2, "adamw")
    assert t.confirm[2]["val_loss"] is not None and t.confirm[0]["val_loss"] is None


class FakeSweeps:
    """Stands in for the sweep driver: writes each proxy's trials.parquet from the law."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[str, int, bool]] = []
        self.fail_at = fail_at

    def __call__(self, sweep, train):
        self.calls.append((sweep.name, train.n_embd, sweep.resume))
        if self.fail_at is not None and train.n_embd == self.fail_at:
            raise KeyboardInterrupt  # the transfer cut short
        root = Path(sweep.storage_path) / sweep.name
        rows = proxy_rows(train.n_embd, np.random.default_rng(train.n_embd))
        if sweep.name == "confirm-target":
            lo, hi = sweep.lr_ranges()["adamw"]
            lrs = np.geomspace(lo, hi, 3)
            rows = [
                r
                | {
                    "learning_rate": float(lr),
                    "final_val_loss": 2 + 0.1 * math.log(lr / best_at(train.n_embd)) ** 2,
                }
                for lr in lrs
                for r in rows[:1]
            ]
        write_trials(root, rows, CONFIG | {"n_embd": train.n_embd})
        (root / "sweep.json").write_text(json.dumps({"sweep": {}, "config": {}}))
        return {"status_counts": {"completed": len(rows)}}


def transfer_args(tmp_path, *extra):
    return [*TINY, "--optimizers", "adamw", "--search", "grid", "--grid-points", "3",
            "--transfer", "n_embd=16,32,48", "--target", "n_embd=128", "--name", "t",
            "--storage-path", str(tmp_path), *extra]  # fmt: skip


def test_a_resumed_transfer_skips_the_proxies_it_finished(tmp_path, capsys):
    cut = FakeSweeps(fail_at=32)
    with pytest.raises(KeyboardInterrupt):
        transfer.run(*sweep_cli.configs_from_argv(transfer_args(tmp_path)), cut)
    assert [c[:2] for c in cut.calls] == [("n_embd=16", 16), ("n_embd=32", 32)]
    state = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert state["finished"] == ["proxies/n_embd=16"]
    # Without --resume the folder is taken; with it, the finished proxy is skipped.
    with pytest.raises(UserError, match="already exists"):
        transfer.run(*sweep_cli.configs_from_argv(transfer_args(tmp_path)), FakeSweeps())
    rest = FakeSweeps()
    outcome = transfer.run(
        *sweep_cli.configs_from_argv(transfer_args(tmp_path, "--resume", "--confirm")), rest
    )
    assert [c[:2] for c in rest.calls] == [
        ("n_embd=32", 32),
        ("n_embd=48", 48),
        ("confirm-target", 128),
    ]
    out = capsys.readouterr().out
    assert "[transfer] proxies/n_embd=16: finished in an earlier run; skipped" in out
    assert re.search(r"^adamw: lr .* for n_embd=128, from 3 proxies; cost ", out, re.M)
    assert re.search(r"^adamw: confirmed at n_embd=128: val .* of the three$", out, re.M)
    assert set(outcome["predictions"]) == {"adamw"} and "adamw" in outcome["confirmed"]
    assert (tmp_path / "t" / "transfer.png").exists()
    rows = pq.read_table(tmp_path / "t" / "transfer.parquet").to_pylist()
    assert [r["multiple"] for r in rows if r["kind"] == "confirm"] == [0.5, 1.0, 2.0]
    # Everything finished: a second resume trains nothing.
    again = FakeSweeps()
    transfer.run(*sweep_cli.configs_from_argv(transfer_args(tmp_path, "--resume")), again)
    assert again.calls == []


def run_sweep_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raygpt.sweep", *TINY, "--storage-path", str(tmp_path / "s"),
         *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--transfer", "n_embd=16,32,48", "--target", "n_embd=8"],
            "target n_embd=8 is smaller than the proxies (16..48); a transfer predicts upward",
        ),
        (
            ["--transfer", "n_embd=16,33,48", "--target", "n_embd=96"],
            "n_embd=33 is not divisible by n_head=2",
        ),
        (["--transfer", "n_embd=16,32", "--target", "n_embd=97"], "--target: n_embd=97"),
        (["--transfer", "lr=1,2", "--target", "n_embd=64"], "'lr' is not a model size key"),
        (["--target", "n_embd=64"], "--target belongs to a transfer"),
    ],
)
def test_bad_transfer_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    proc = run_sweep_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0]
    assert not (tmp_path / "s").exists()  # refused before anything was written
