"""The learning-rate law from the service's database (raygpt/service/law.py, `GET /lr-law`
and `python -m raygpt.service lr-law`) on SQLite and on a real PostgreSQL server.

Sweeps with a known law (tests/unit/report/test_lr_law.py's builders) are written with
raygpt's own writers, sweep.json and trials.parquet, and ingested with index.ingest; the
law fitted from the database is then the law `python -m raygpt.report --lr-law` fits from
the same folders: the same rows, lines and lr_law.json. Filters choose the trials, and
bad input is one line and exit 2. No Ray: the app is served by Uvicorn in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from service_http import FixedCluster, served_over_http
from unit.report.test_lr_law import ALPHA, VOCAB, base_config, trial_rows, truth, write_sweep

from raygpt import results, storage
from raygpt.model.sizes import non_embedding_params
from raygpt.report.driver import render_lr_law
from raygpt.report.transfer import law_outputs, law_rows
from raygpt.report.transfer.fit import LOSS_KEY
from raygpt.service import auth, index, law
from raygpt.service.app import build_app
from raygpt.service.cli import main
from raygpt.sweep import remote
from raygpt.train import preflight

BUDGETS = (1000, 4000)
WIDTHS = [64, 128, 256, 512]
PREDICT = "N=2M,D=4e6"
# What the fit reads of a law row (law.py, fit.py): these must agree between the paths.
FITTED = ("trial_id", "optimizer", "learning_rate", "status", LOSS_KEY, "N", "D",
          "parametrization", "other", "sweep")  # fmt: skip


def muon(n: float, d: float) -> float:
    return truth(n, d, a=2e-2, alpha=-0.1, beta=0.0)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> list[Path]:
    """Two sweeps of widths 64..512, adamw and muon, at 1000 and 4000 steps. The first
    records each trial's n_params, as raygpt.sweep writes it; the second, a table written
    before that column, leaves N to its config and data record."""
    root = tmp_path_factory.mktemp("storage")
    store = storage.resolve(str(root), check=False)
    rng = np.random.default_rng(0)
    out = []
    for steps in BUDGETS:
        rows = trial_rows(WIDTHS, steps, rng) + trial_rows(
            WIDTHS, steps, rng, optimizer="muon", law=muon
        )
        if steps == BUDGETS[0]:
            for row in rows:
                width = json.loads(row["params"])["n_embd"]
                row["n_params"] = non_embedding_params(2, width, VOCAB)
        rows.sort(key=lambda r: r["trial_id"])  # the trials table's order
        folder = write_sweep(root / f"sweep-{steps}", rows, base_config(steps))
        footer = results.decode_metadata(
            results.read_table(store, f"{folder}/{results.TRIALS_FILE}").schema
        )
        preflight.write_record(store, f"{folder}/{results.SWEEP_FILE}", footer)
        out.append(folder)
    return out


@pytest.fixture
def indexed(db, sweeps):
    for folder in sweeps:
        index.ingest(db, str(folder))
    return db


def report(sweeps: list[Path], tmp_path: Path, predict: str | None = PREDICT):
    """`python -m raygpt.report --lr-law`'s lines and record over the folders."""
    lines, _, record = render_lr_law(
        [str(s) for s in sweeps], tmp_path / "report", predict, plots=False
    )
    return lines, record


def test_the_database_gives_the_folders_law(indexed, sweeps, tmp_path):
    from_db = law.law_rows_from_db(indexed)
    from_folders = law_rows.read_sweeps(sweeps)
    assert len(from_db) == len(from_folders) > 0
    assert [set(r) for r in from_db] == [set(r) for r in from_folders]
    assert [[r[k] for k in FITTED] for r in from_db] == [
        [r[k] for k in FITTED] for r in from_folders
    ]

    lines, record = report(sweeps, tmp_path)
    laws, db_lines, db_record = law.fit(indexed, "", PREDICT)
    assert db_lines == lines and len(lines) == 4  # two laws, two predictions
    assert db_lines[0].startswith("adamw: lr = 2.") and db_lines[1].startswith("muon: lr = 2.")
    assert db_record == {"filters": "", **record}
    for opt, fitted in laws.items():
        theirs = record["laws"][opt]
        for key in ("a", "alpha", "beta"):
            assert getattr(fitted, key) == pytest.approx(theirs[key], abs=1e-9)
    assert laws["adamw"].alpha == pytest.approx(ALPHA, abs=0.05)


def test_filters_choose_the_trials(indexed, sweeps, tmp_path):
    everything = law.fit(indexed)[1]
    _, lines, record = law.fit(indexed, "optimizer=adamw")
    assert lines == [everything[0]] and set(record["laws"]) == {"adamw"}
    assert record["filters"] == "optimizer=adamw"
    # One sweep's trials: the law report --lr-law fits from that one folder.
    _, lines, record = law.fit(indexed, [("sweep", "sweep-1000")])
    assert lines == report(sweeps[:1], tmp_path, None)[0]
    assert "β fixed at 0: D was not varied" in lines[0]
    assert record["sweeps"] == [str(sweeps[0])]


# --------------------------------------------------------------------------- the command


@pytest.fixture
def served(indexed, tmp_path, monkeypatch):
    """The app on 127.0.0.1 through Uvicorn, in a thread; the command finds it and a
    token in the environment, as a user's shell would have them."""
    token = auth.add_user(indexed, "ada")
    with served_over_http(build_app(indexed, FixedCluster(), str(tmp_path / "results"))) as url:
        monkeypatch.setenv(remote.SERVICE_ENV, url)
        monkeypatch.setenv(remote.TOKEN_ENV, token)
        yield token


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_the_command_prints_the_report_s_lines_and_writes_its_files(
    served, indexed, sweeps, tmp_path, capsys
):
    token = served
    lines, record = report(sweeps, tmp_path)
    out_dir = tmp_path / "law"
    code, out, err = run(capsys, "lr-law", "--predict", PREDICT, "--out", out_dir)
    written = [out_dir / law_outputs.LAW_FILE, out_dir / law_outputs.LAW_PLOT]
    assert (code, err) == (0, "")
    assert out == "\n".join([*lines, "", *(f"wrote {p}" for p in written)]) + "\n"
    assert json.loads(written[0].read_text()) == {"filters": "", **json.loads(json.dumps(record))}
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert token not in out
    # On the head, the database itself gives the same.
    code, direct, _ = run(
        capsys,
        "lr-law",
        "optimizer=adamw",
        "--out",
        out_dir,
        "--db",
        indexed.url.render_as_string(hide_password=False),
    )
    assert code == 0 and direct.splitlines()[0] == lines[0] and len(direct.splitlines()) == 4

    err = refused(capsys, "lr-law", "optimiser=adamw", "--out", out_dir)
    assert "unknown filter 'optimiser' (did you mean 'optimizer'?)" in err
    err = refused(capsys, "lr-law", "sweep=sweep-1000", "n_embd=64", "--out", out_dir)
    assert "no learning-rate law: adamw: 1 size(s) with an interior best lr" in err
    written[0].unlink()
    err = refused(capsys, "lr-law", "--predict", "N=700M,D=4e6", "--out", out_dir)
    assert "111x outside the range" in err and "--extrapolate" in err
    assert not written[0].exists()  # refused before anything is written
    err = refused(capsys, "lr-law", "--predict", "N=lots", "--out", out_dir)
    assert "--predict N='lots' is not a number" in err
    err = refused(capsys, "lr-law", "sweep=nothing-here", "--out", out_dir)
    assert "no trials with a known budget match sweep=nothing-here" in err
    code, out, _ = run(
        capsys, "lr-law", "--predict", "N=700M,D=4e6", "--extrapolate", "--out", out_dir
    )
    assert code == 0 and "adamw: predicted lr" in out and "x outside the fitted range" in out
    assert token not in out
