"""Starting a run from weights (--init-from): a Hugging Face GPT-2 directory that the test
saves with transformers, or a raygpt checkpoint; and --eval-only, the initial model's
losses as one step-0 row. Real in-process runs of tiny models, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import step_rows, tiny_config

from raygpt import checkpoint
from raygpt.data import prepare
from raygpt.data import sampler as data_sampler
from raygpt.errors import UserError
from raygpt.train import driver as train_driver

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint_*"))


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
    """A tiny character-level run of 20 steps: the checkpoint later runs start from."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = write_text(root / "shakespeare.txt", TEXT * 40)
    cfg = tiny_config(root / "results", name="source", data_file=str(corpus), in_process="true")
    summary = train_driver.run(cfg)
    return root, corpus, summary


def test_eval_only_of_a_checkpoint_writes_its_final_eval_as_step_zero(source):
    root, corpus, summary = source
    results = root / "results"
    cfg = tiny_config(
        results,
        name="eval-only",
        data_file=str(corpus),
        in_process="true",
        init_from=str(results / "source"),  # a run folder: its latest checkpoint
        eval_only=True,
    )
    got = train_driver.run(cfg)
    rows = step_rows(results / "eval-only")
    assert [r["step"] for r in rows] == [0]
    assert rows[0]["train_loss"] is None  # nothing was trained
    # The same weights on the same evaluation batches as the source's last eval.
    assert rows[0]["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert got["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert checkpoints(results / "eval-only") == []
    assert json.loads((results / "eval-only" / "run.json").read_text())["config"]["eval_only"]


def test_finetune_from_a_checkpoint_folder_starts_from_its_weights(source):
    root, corpus, _ = source
    results = root / "results"
    folder = checkpoint.latest_in_run(str(results / "source"))
    cfg = tiny_config(
        results,
        name="continued",
        data_file=str(corpus),
        in_process="true",
        init_from=folder,
        n_layer=3,  # ignored: the checkpoint brings its own shape
        max_steps=5,
        eval_interval=5,
        learning_rate=1e-4,
        warmup_steps=0,
    )
    train_driver.run(cfg)
    rows = step_rows(results / "continued")
    source_rows = step_rows(results / "source")
    # From scratch the first loss is the source's first (~ln(vocab)); from the checkpoint
    # it is where the source ended.
    assert rows[0]["train_loss"] < source_rows[0]["train_loss"] - 0.4
    assert rows[0]["train_loss"] == pytest.approx(source_rows[-1]["train_loss"], abs=0.1)
    state = checkpoint.load(checkpoint.latest_in_run(str(results / "continued")))
    assert state["model_config"]["n_layer"] == 2 and state["step"] == 5  # a fresh run


def test_init_from_a_checkpoint_with_another_tokenizer_is_refused(source, tmp_path):
    root, _, _ = source
    other = write_text(tmp_path / "other.txt", "abcdefghij klmnop\n" * 200)
    cfg = tiny_config(
        tmp_path / "results",
        name="mismatch",
        data_file=str(other),
        in_process="true",
        init_from=str(root / "results" / "source"),
    )
    with pytest.raises(UserError, match="tokenizer") as err:
        train_driver.run(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "results" / "mismatch").exists()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT2LMHeadModel saved by transformers: 64 positions, 300 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(directory)
    return directory, model.eval()


def test_eval_only_of_a_hugging_face_directory_matches_transformers(source, hf_dir):
    root, corpus, _ = source
    directory, hf = hf_dir
    cfg = tiny_config(
        root / "results",
        name="hf-eval",
        data_file=str(corpus),
        in_process="true",
        init_from=str(directory),
        eval_only=True,
    )
    train_driver.run(cfg)
    (row,) = step_rows(root / "results" / "hf-eval")
    # The loss transformers computes on the same evaluation batches (context cropped to 32).
    dataset_dir, _ = prepare.prepare_from_config(cfg)
    sampler = data_sampler.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)
    losses = []
    with torch.no_grad():
        for x, y in sampler.eval_batches(cfg.eval_iters, cfg.batch_size, 0, 1):
            logits = hf(x.long()).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert row["val_loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-4)


def test_finetune_from_a_hugging_face_directory_lowers_the_loss(source, hf_dir):
    root, corpus, _ = source
    directory, _ = hf_dir
    cfg = tiny_config(
        root / "results",
        name="hf-finetune",
        data_file=str(corpus),
        in_process="true",
        init_from=str(directory),
        dropout=0.1,
    )
    train_driver.run(cfg)
    rows = step_rows(root / "results" / "hf-finetune")
    evals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert rows[0]["train_loss"] == pytest.approx(math.log(300), abs=0.3)  # the HF init
    assert evals[-1] < rows[0]["train_loss"] - 1.0, evals
    state = checkpoint.load(checkpoint.latest_in_run(str(root / "results" / "hf-finetune")))
    shape = state["model_config"]
    assert (shape["n_layer"], shape["vocab_size"], shape["block_size"]) == (1, 300, 32)
    assert shape["bias"] and shape["dropout"] == 0.1
