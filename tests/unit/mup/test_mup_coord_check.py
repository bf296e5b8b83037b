"""The coordinate check (raygpt.mup): flat under mup in width and under completep in
depth, sp's logits flagged as growing with width, mup's residual stream flagged as growing
with depth; the command writes its PNG and table and exits 1 when a promise fails.

A tiny model (2 layers, 2 heads, 8 x 32 tokens a step, 5 steps, 2 seeds) on the embedded
corpus, in this process on the CPU: seconds, no Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from raygpt.config.train import load_train_config
from raygpt.mup import coord_check, driver

TINY = dict(n_layer=2, n_head=2, n_embd=64, batch_size=8, block_size=32, learning_rate=1e-3)
WIDTHS, DEPTHS = (32, 64, 128, 256), (2, 4, 8, 16)
TOL = coord_check.DEFAULT_TOLERANCE


def _check(parametrization: str, widths=WIDTHS, depths=(), **overrides):
    cfg = load_train_config(None, {**TINY, "parametrization": parametrization, **overrides})
    rows = coord_check.run(cfg, widths, depths, steps=5, seeds=2)
    sizes = len(widths) + len(depths)
    assert len(rows) == sizes * 2 * 5 * len(coord_check.LAYER_TYPES)
    return rows, {(v.axis, v.layer): v for v in coord_check.verdicts(rows)}


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_every_layer_type_is_flat_in_width(data_dir, parametrization):
    _, verdicts = _check(parametrization)
    assert {layer for _, layer in verdicts} == set(coord_check.LAYER_TYPES)
    for verdict in verdicts.values():
        assert verdict.expected == "flat" and verdict.passed, verdict


def test_sp_is_flagged_growing_with_width(data_dir):
    rows, verdicts = _check("sp")
    assert verdicts["width", "logits"].expected == "grows"
    assert verdicts["width", "logits"].passed, verdicts["width", "logits"]
    # Held to mup's promise, sp fails it: its hidden activations grow about linearly.
    for layer in ("attention", "mlp", "residual", "logits"):
        assert verdicts["width", layer].slope > 2 * TOL, verdicts["width", layer]
    # Step 1 is the model at init: sp's tied head already grows there (~sqrt(width)).
    first = coord_check.slope(coord_check.mean_rms(rows, "width", 1, "logits"))
    assert 0.3 < first < 0.7


def test_completep_is_flat_in_depth_where_mup_grows(data_dir):
    _, completep = _check("completep", widths=(), depths=DEPTHS)
    _, mup = _check("mup", widths=(), depths=DEPTHS)
    for layer in ("embedding", "residual", "logits"):
        assert completep["depth", layer].passed, completep["depth", layer]
    assert mup["depth", "residual"].expected == "grows"
    assert mup["depth", "residual"].passed and mup["depth", "residual"].slope > 0.5
    assert completep["depth", "attention"].passed is None  # reported only


def test_a_broken_promise_exits_1(data_dir, tmp_path):
    """A tolerance no real check meets: the verdict fails and the command says which."""
    lines: list[str] = []
    argv = ["coord-check", "--parametrization", "mup", "--widths", "32,64", "--steps", "2"]
    argv += ["--tolerance", "1e-6", "--out", str(tmp_path), "--n-layer", "1", "--n-head", "2"]
    code, verdicts = driver.check(argv, log=lines.append)
    assert code == 1 and any(v.passed is False for v in verdicts)
    assert "FAIL: width" in lines[-1]


def test_the_command_writes_its_figure_and_table(data_dir, tmp_path):
    out = tmp_path / "cc"
    args = ["coord-check", "--parametrization", "mup", "--widths", "64,128,256", "--steps", "5"]
    args += ["--seeds", "2", "--n-layer", "2", "--n-head", "2", "--out", str(out)]
    # TINY's batch and learning rate, as flags: the in-process checks above pass with them.
    args += ["--batch-size", "8", "--block-size", "32", "--learning-rate", "1e-3"]
    done = subprocess.run(
        [sys.executable, "-m", "raygpt.mup", *args],
        cwd=REPO,
        env={**os.environ, "RAYGPT_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    verdict_lines = [line for line in lines if line.startswith("  width ")]
    assert len(verdict_lines) == len(coord_check.LAYER_TYPES)
    assert all(" pass " in line for line in verdict_lines), verdict_lines
    assert "mup: 5 of 5 checked lines as expected: pass" in lines[-1]
    assert (out / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(out / "coord_check.parquet")
    assert table.num_rows == 3 * 2 * 5 * len(coord_check.LAYER_TYPES)  # sizes, seeds, steps
    assert set(table.column("layer").to_pylist()) == set(coord_check.LAYER_TYPES)
    assert (out / "coord_check.csv").is_file()
