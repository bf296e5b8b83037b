"""What a run shows while it trains: the model's size by module, text samples (console
and TensorBoard), HellaSwag on the live model in the step rows; and after it, the
single-run loss curve and `raygpt.sample --interactive`. One tiny in-process run (Ray
Train's local mode: no cluster) serves them all."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
from builders import ITEMS, write_jsonl
from conftest import REPO, run_main, step_rows, tiny_config
from conftest import TINY_IN_PROCESS as TINY

from raygpt import sample
from raygpt.eval import hellaswag, scoring
from raygpt.model import loading
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.model.param_table import format_table, parameter_rows
from raygpt.report import driver as report_driver
from raygpt.train import cli as train_cli
from raygpt.train import driver as train_driver

SEPARATOR = "---------------"
SAMPLE_TOKENS = 24


@pytest.fixture(scope="module")
def observed(data_dir, tmp_path_factory):
    """A run sampling every 5 steps and scoring HellaSwag (three hand-written items)
    every 4; its console output captured."""
    root = tmp_path_factory.mktemp("observed")
    items = write_jsonl(root / "hellaswag.jsonl", ITEMS)
    cfg = tiny_config(
        root,
        name="observed",
        sample_every=5,
        sample_tokens=SAMPLE_TOKENS,
        sample_prompt="def ",
        hellaswag_every=4,
        hellaswag_file=str(items),
        **TINY,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_driver.run(cfg)
    return root / "observed", out.getvalue(), items


def test_model_summary_rows_add_up_to_the_parameters():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=32))
    rows = dict(parameter_rows(model))
    total = sum(p.numel() for p in model.parameters())  # the tied embedding once
    assert rows.pop("total") == total == model.n_params(non_embedding=False)
    assert sum(rows.values()) == total
    assert rows["lm_head (tied to wte)"] == 0
    assert rows["wte (tokens)"] == 50 * 32 and rows["wpe (positions)"] == 16 * 32
    per_block = sum(p.numel() for p in model.transformer.h[0].attn.parameters())
    assert rows[f"h.0-2 attn, 3 x {per_block:,}"] == 3 * per_block  # identical blocks: one row
    assert f"{total:,}" in format_table(model).splitlines()[-1]


def test_model_summary_printed_when_training_starts(observed):
    _, printed, _ = observed
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if "parameters by module" in line))
    assert lines[start + 1].split()[0] == "wte" and lines[start + 8].split()[0] == "total"
    # before the first step's line
    assert start < lines.index(next(line for line in lines if line.startswith("step ")))


def test_samples_are_printed_and_in_tensorboard(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, printed, _ = observed
    printed_samples = {}
    for block in printed.split("[raygpt] sample at step ")[1:]:
        step, text = block.split(":\n", 1)
        printed_samples[int(step)] = text[: len("def ") + SAMPLE_TOKENS]
    assert sorted(printed_samples) == [5, 10, 12]  # every 5 steps, and the last
    for text in printed_samples.values():
        assert text.startswith("def ")

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    stored = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples")}
    assert sorted(stored) == [5, 10, 12]
    for step, text in stored.items():
        # Markdown code block: every line indented four spaces.
        assert "\n".join(line[4:] for line in text.split("\n")) == printed_samples[step]
    assert events.SummaryMetadata("samples").plugin_data.plugin_name == "text"


def test_hellaswag_acc_norm_lands_in_the_step_rows(observed):
    run_dir, printed, _ = observed
    scores = {r["step"]: r["hellaswag_acc_norm"] for r in step_rows(run_dir)}
    assert sorted(s for s, v in scores.items() if v is not None) == [4, 8, 12]
    for step in (4, 8, 12):
        assert 0 <= scores[step] <= 1 and (scores[step] * 3) == pytest.approx(
            round(scores[step] * 3)
        )
    assert "[raygpt] hellaswag: acc_norm of 3 val examples every 4 steps" in printed
    assert f"hellaswag {scores[12]:.4f}" in printed


def test_hellaswag_during_training_equals_scoring_the_checkpoint(observed):
    # The final checkpoint holds the weights the last score saw: raygpt.evals on it,
    # build-nanogpt's convention, must agree.
    run_dir, _, items = observed
    loaded = loading.from_checkpoint(str(run_dir))
    assert loaded.step == 12
    rendered = [hellaswag.render(e, loaded.tokenizer) for e in hellaswag.read_examples(items)]
    flat = scoring.sum_logprobs(loaded.model, hellaswag.spans_of(rendered))
    want = hellaswag.accuracy(rendered, flat)["tokens"]["acc_norm"]
    assert {r["step"]: r["hellaswag_acc_norm"] for r in step_rows(run_dir)}[12] == want


def test_report_draws_a_single_run_loss_curve(observed, capsys):
    run_dir, _, _ = observed
    assert report_driver.main([str(run_dir)]) == 0
    png = run_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_interactive_sample_reads_prompts_until_quit(observed):
    run_dir, _, _ = observed
    stdin = "def \nclass \u2603\nimport\n:q\nnever read\n"
    args = ["--checkpoint", str(run_dir), "--interactive", "--max-new-tokens", "10"]
    result = subprocess.run(
        [sys.executable, "-m", "raygpt.sample", *args],
        input=stdin,
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers = result.stdout.split(SEPARATOR + "\n")
    assert answers[-1] == "" and len(answers) == 3  # "def " and "import"; none after :q
    assert all(len(a) == 10 + 1 for a in answers[:-1])  # the continuation and a newline
    # An unwritable prompt is one error line; the session goes on.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'\u2603'" in errors[0]


def test_interactive_sample_stops_at_end_of_input(observed, capfd, monkeypatch):
    run_dir, _, _ = observed
    args = ["--checkpoint", str(run_dir), "--interactive", "--max-new-tokens", "5"]
    args += ["--num-samples", "2"]
    # In this process: the test above runs the command as its own process.
    monkeypatch.setattr(sys, "stdin", io.StringIO("x"))
    result = run_main(sample.main, *args, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(SEPARATOR) == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sample-every", "5", "--sample-prompt", "\u2603"], "--sample-prompt '\u2603'"),
        (["--hellaswag-every", "5", "--hellaswag-file", "/no/such.jsonl"], "hellaswag file"),
        (["--hellaswag-every", "5", "--hellaswag-file", "UNWRITABLE"], "none of the 1 HellaSwag"),
        (["--sample-every", "-1"], "sample_every=-1 must be >= 0"),
    ],
)
def test_bad_observability_input_is_one_line_before_training(
    data_dir, tmp_path, capsys, flags, message
):
    item = {**ITEMS[0], "ctx": "\u2603", "ctx_a": "\u2603"}
    flags = [
        str(write_jsonl(tmp_path / "bad.jsonl", [item])) if f == "UNWRITABLE" else f for f in flags
    ]
    argv = ["--storage-path", str(tmp_path), "--name", "bad", "--in-process", "true", *flags]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()
