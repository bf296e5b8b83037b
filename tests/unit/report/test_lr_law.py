"""raygpt.report.transfer.law and `python -m raygpt.report --lr-law` on synthetic sweeps (no Ray).

The sweeps are written in the real trials.parquet format (results.TRIAL_SCHEMA, with the
footer raygpt.sweep writes), from a known law: best lr = A (N/1e6)^ALPHA (D/1e8)^BETA,
loss = 2 + 0.1 (ln lr - ln best)^2 + noise per seed.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run_main, run_module, write_trials_parquet

from raygpt import results
from raygpt.errors import UserError
from raygpt.model import sizes
from raygpt.model.sizes import non_embedding_params
from raygpt.report import driver as report_driver
from raygpt.report.transfer import law_outputs, law_rows
from raygpt.report.transfer.law import fit_law, fit_laws

A, ALPHA, BETA = 2e-3, -0.5, -0.2
VOCAB = 65
TOKENS_PER_STEP = 16 * 64  # batch_size x block_size x 1 worker
GRID = 1e-4 * 2.0 ** np.arange(15)  # 1e-4 .. 1.6: one grid for every size
N_64 = non_embedding_params(2, 64, VOCAB)  # 103k
N_512 = non_embedding_params(2, 512, VOCAB)  # 6.3M


def truth(n: float, d: float, a=A, alpha=ALPHA, beta=BETA) -> float:
    return a * (n / 1e6) ** alpha * (d / 1e8) ** beta


def base_config(max_steps: int, **extra) -> dict:
    return {
        "n_layer": 2,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 64,
        "batch_size": 16,
        "num_workers": 1,
        "tokens_per_step": None,
        "bias": False,
        "init_from": "scratch",
        "max_steps": max_steps,
    } | extra


def trial_rows(
    widths, max_steps, rng, *, optimizer="adamw", law=truth, seeds=2, noise=0.01, tag=""
):
    """Rows of trials.parquet: each width's curve on the grid points within 16x of its best."""
    rows = []
    for w in widths:
        n = non_embedding_params(2, w, VOCAB)
        best = law(n, max_steps * TOKENS_PER_STEP)
        for lr in GRID[np.abs(np.log2(GRID / best)) <= 4]:
            for seed in range(seeds):
                loss = 2 + 0.1 * math.log(lr / best) ** 2 + rng.normal(0, noise)
                params = {
                    "optimizer": optimizer,
                    "learning_rate": float(lr),
                    "n_embd": w,
                    "seed": seed,
                }
                rows.append(
                    {name: None for name in results.TRIAL_SCHEMA.names}
                    | {
                        "trial_id": f"{tag}{optimizer}-{w}-{lr:.3g}-{seed}",
                        "optimizer": optimizer,
                        "learning_rate": float(lr),
                        "params": json.dumps(params),
                        "status": "completed",
                        "steps": max_steps,
                        "best_val_loss": loss,
                        "final_val_loss": loss,
                        "final_train_loss": loss,
                        "tokens": max_steps * TOKENS_PER_STEP,
                        "seed": seed,
                        "config_key": json.dumps({k: v for k, v in params.items() if k != "seed"}),
                        "phase": "search",
                    }
                )
    return rows


def write_sweep(folder: Path, rows: list[dict], config: dict) -> Path:
    """trials.parquet as raygpt.sweep writes it: the rows, and the sweep's config and data
    facts in the footer."""
    meta = {
        "sweep": {"name": folder.name},
        "config": config,
        "data": {"dataset": "shakespeare_char", "tokenizer": "char", "vocab_size": VOCAB},
    }
    return write_trials_parquet(folder, rows, meta)


@pytest.fixture
def sweeps(tmp_path) -> list[Path]:
    """Two sweeps of widths 64..512 at budgets of 1000 and 8000 steps, adamw and muon."""
    rng = np.random.default_rng(0)
    muon = lambda n, d: truth(n, d, a=2e-2, alpha=-0.1, beta=0.0)  # noqa: E731
    out = []
    for steps in (1000, 8000):
        rows = trial_rows([64, 128, 256, 512], steps, rng)
        rows += trial_rows([64, 128, 256, 512], steps, rng, optimizer="muon", law=muon)
        out.append(write_sweep(tmp_path / f"sweep-{steps}", rows, base_config(steps)))
    return out


# --------------------------------------------------------------------------- N and D


@pytest.mark.parametrize(
    ("n_layer", "n_embd", "vocab", "bias"),
    [(2, 64, 65, False), (3, 96, 65, True), (1, 48, 50304, False), (2, 64, 50304, True)],
)
def test_non_embedding_params_is_the_models_count(n_layer, n_embd, vocab, bias):
    torch = pytest.importorskip("torch")
    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            block_size=32, vocab_size=vocab, n_layer=n_layer, n_head=4, n_embd=n_embd, bias=bias
        )
    )
    assert non_embedding_params(n_layer, n_embd, vocab, bias) == model.n_params(non_embedding=True)


def test_padded_vocab_and_n_d_from_a_sweep(tmp_path):
    assert sizes.padded_vocab_size(50257) == 50304 and sizes.padded_vocab_size(65) == 65
    rows = trial_rows([64], 1000, np.random.default_rng(0))
    found = law_rows.law_rows(write_sweep(tmp_path / "s", rows, base_config(1000)))
    assert {r["N"] for r in found} == {non_embedding_params(2, 64, VOCAB)}  # params' n_embd
    assert {r["D"] for r in found} == {1000 * TOKENS_PER_STEP}
    assert {r["parametrization"] for r in found} == {"sp"}


def test_law_rows_prefer_the_recorded_size_and_parametrization(tmp_path):
    """A trial's own n_params and parametrization columns win over its config's."""
    rows = trial_rows([64], 1000, np.random.default_rng(0))
    rows = [r | {"n_params": 123_456, "parametrization": "mup"} for r in rows]
    found = law_rows.law_rows(write_sweep(tmp_path / "s", rows, base_config(1000)))
    assert {r["N"] for r in found} == {123_456}
    assert {r["parametrization"] for r in found} == {"mup"}


# --------------------------------------------------------------------------- the law


def test_law_recovers_a_alpha_beta_with_intervals_that_cover_them(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for steps in (1000, 4000, 16000):
        folder = write_sweep(
            tmp_path / f"s{steps}", trial_rows([64, 128, 256, 512], steps, rng), base_config(steps)
        )
        rows += law_rows.law_rows(folder)
    law = fit_law(rows, "adamw")
    assert len(law.points) == 12 and not law.excluded
    assert law.a == pytest.approx(A, rel=0.1)
    assert law.alpha == pytest.approx(ALPHA, abs=0.05)
    assert law.beta == pytest.approx(BETA, abs=0.05)
    assert law.a_interval[0] < A < law.a_interval[1]
    assert law.alpha_interval[0] < ALPHA < law.alpha_interval[1]
    assert law.beta_interval[0] < BETA < law.beta_interval[1]
    assert law.n_range == (N_64, N_512)
    assert law.d_range == (1000 * TOKENS_PER_STEP, 16000 * TOKENS_PER_STEP)
    line = law.line()
    assert "\n" not in line and line.startswith("adamw: lr = 2.")
    assert "fitted on N 103k..6.3M, D 1.0e6..1.6e7 tokens, 12 sizes" in line
    # A prediction inside the range, with its interval around the truth.
    p = law.predict(2e6, 4e6)
    assert p.low < truth(2e6, 4e6) < p.high and not p.extrapolated


def test_only_n_varied_fits_alpha_and_fixes_beta(sweeps):
    law = fit_law(law_rows.law_rows(sweeps[0]), "adamw")
    assert law.beta == 0.0 and law.beta_interval is None
    assert "beta is fixed at 0: D was not varied" in law.notes
    assert "β fixed at 0: D was not varied" in law.line()
    # The law's one D is the default for a prediction.
    assert law.d_range[0] == law.predict(2e6).D
    with pytest.raises(UserError, match="give D"):
        fit_law(law_rows.read_sweeps(sweeps), "adamw").predict(2e6)


def test_predict_refuses_100x_unless_extrapolate(sweeps):
    law = fit_law(law_rows.read_sweeps(sweeps), "adamw")
    with pytest.raises(UserError) as err:
        law.predict(100 * N_512, 4e6)
    line = one_line(err)
    assert line.startswith(
        "adamw: N=633M is 100x outside the range the law was fitted on (N 103k..6.3M)"
    )
    assert "--extrapolate" in line
    p = law.predict(100 * N_512, 4e6, extrapolate=True)
    assert p.extrapolated and p.factor_n == pytest.approx(100, rel=0.01)
    assert p.low < p.lr < p.high
    # Within the factor (4x): no refusal.
    assert not law.predict(4 * law.n_range[1], 4e6).extrapolated


def test_one_size_is_too_few(tmp_path):
    folder = write_sweep(
        tmp_path / "s", trial_rows([64], 1000, np.random.default_rng(2)), base_config(1000)
    )
    with pytest.raises(UserError) as err:
        fit_laws(law_rows.law_rows(folder))
    assert one_line(err).startswith(
        "no learning-rate law: adamw: 1 size(s) with an interior best lr"
    )


def test_n_and_d_varied_together_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for w, steps in ((64, 1000), (256, 16000)):
        rows += law_rows.law_rows(
            write_sweep(tmp_path / f"s{w}", trial_rows([w], steps, rng), base_config(steps))
        )
    # Two sizes, each a step up in both N and D: one line in (ln N, ln D) cannot give
    # two exponents.
    with pytest.raises(UserError, match="N and D vary together across the 2 sizes"):
        fit_law(rows, "adamw")


def test_mixed_parametrizations_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    rows = law_rows.law_rows(
        write_sweep(tmp_path / "sp", trial_rows([64, 128], 1000, rng), base_config(1000))
    )
    rows += law_rows.law_rows(
        write_sweep(
            tmp_path / "mup",
            trial_rows([256], 1000, rng, tag="m"),
            base_config(1000, parametrization="mup"),
        )
    )
    with pytest.raises(UserError, match="mix parametrizations mup, sp"):
        fit_law(rows, "adamw")


def test_edge_curves_and_short_curves_are_left_out(tmp_path):
    rng = np.random.default_rng(5)
    rows = trial_rows([64, 128, 256], 1000, rng)
    # width 512: only lrs far above its best, so its lowest loss is at the grid's bottom.
    best_512 = truth(non_embedding_params(2, 512, VOCAB), 1000 * TOKENS_PER_STEP)
    rows += [r for r in trial_rows([512], 1000, rng) if r["learning_rate"] > best_512 * 1.5]
    law = fit_law(law_rows.law_rows(write_sweep(tmp_path / "s", rows, base_config(1000))), "adamw")
    assert len(law.points) == 3
    ((n, _d, why),) = law.excluded
    assert n == N_512 and why.startswith("best lr at the grid's lowest point")


def test_deterministic(sweeps):
    rows = law_rows.read_sweeps(sweeps)
    one, two = fit_law(rows, "adamw", seed=3), fit_law(rows, "adamw", seed=3)
    assert np.array_equal(one.draws, two.draws) and one.line() == two.line()


def test_parse_point():
    assert law_outputs.parse_point("N=124M,D=2.5e9") == {"N": 124e6, "D": 2.5e9}
    assert law_outputs.parse_point("D=1B") == {"D": 1e9}
    for bad in ("124M", "X=1", "N=abc", ""):
        with pytest.raises(UserError):
            law_outputs.parse_point(bad)


# --------------------------------------------------------------------------- CLI


def run_cli(*args) -> subprocess.CompletedProcess:
    return run_module("raygpt.report", *args)


@pytest.fixture(name="call_cli")
def call_cli_fixture(capfd):
    """raygpt.report's main in this process (the command's own process is run above)."""
    return lambda *args: run_main(report_driver.main, *args, capfd=capfd)


def assert_refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_cli_prints_a_line_per_optimizer_and_writes_lr_law_json(sweeps):
    proc = run_cli("--lr-law", *sweeps, "--predict", "N=2M,D=4e6")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("adamw: lr = 2.") and "fitted on N 103k..6.3M" in lines[0]
    assert lines[1].startswith("muon: lr = 2.")
    assert lines[2].startswith("adamw: predicted lr ")
    written = sweeps[0] / law_outputs.LAW_FILE
    assert f"wrote {written}" in proc.stdout
    assert (sweeps[0] / law_outputs.LAW_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(written.read_text())
    assert set(record["laws"]) == {"adamw", "muon"}
    assert record["laws"]["adamw"]["alpha"] == pytest.approx(ALPHA, abs=0.05)
    assert (
        record["laws"]["adamw"]["beta_interval"][0]
        < BETA
        < record["laws"]["adamw"]["beta_interval"][1]
    )
    assert record["predictions"]["adamw"]["N"] == 2e6
    assert record["sweeps"] == [str(s) for s in sweeps]


def test_cli_refuses_to_extrapolate_100x_without_the_flag(sweeps, tmp_path, call_cli):
    line = assert_refused(call_cli("--lr-law", *sweeps, "--predict", "N=700M,D=4e6"))
    assert "111x outside the range" in line and "--extrapolate" in line
    assert not (sweeps[0] / law_outputs.LAW_FILE).exists()  # nothing written when refused
    proc = call_cli(
        "--lr-law",
        *sweeps,
        "--predict",
        "N=640M,D=4e6",
        "--extrapolate",
        "--no-plots",
        "--out",
        tmp_path / "out",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / law_outputs.LAW_FILE).exists()
    assert not (tmp_path / "out" / law_outputs.LAW_PLOT).exists()


def test_cli_bad_input_is_one_line(tmp_path, sweeps, call_cli):
    line = assert_refused(call_cli("--lr-law", tmp_path / "no-such-sweep"))
    assert "no-such-sweep" in line
    one = write_sweep(
        tmp_path / "one", trial_rows([64], 1000, np.random.default_rng(6)), base_config(1000)
    )
    assert "1 size(s)" in assert_refused(call_cli("--lr-law", one))
    assert "go with --lr-law" in assert_refused(call_cli(sweeps[0], "--predict", "N=1M"))
    assert "put" in assert_refused(call_cli(sweeps[0], "--lr-law", sweeps[1]))
