"""The sample and bench CLIs, end to end (fast: no Ray, no network).

Each command's first test runs it as its own process, as a user types it; the others call
its `main` in this process, which prints, writes and returns the exit code the same way
and saves the seconds of a second interpreter importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_main

from raygpt import bench, checkpoint, sample
from raygpt.config.train import TrainConfig
from raygpt.model.gpt import GPT, GPTConfig

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
)
SEPARATOR = "---------------"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return {**os.environ, "RAYGPT_DATA_DIR": str(data_dir)}


def run(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A checkpoint in the training loop's format: a tiny untrained GPT on a char vocab."""
    itos = sorted(set(TEXT))
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, bias=False)
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=16, vocab_size=len(itos), n_layer=1, n_head=2, n_embd=16, bias=False)
    )
    directory = tmp_path / "run" / checkpoint.checkpoint_dir_name(10)
    checkpoint.save(
        directory,
        {
            "model": model.state_dict(),
            "optimizer": {},
            "scaler": {},
            "step": 10,
            "rng": {"torch": torch.get_rng_state()},
            "first_loss": 4.0,
            "best_val_loss": 4.0,
            "config": cfg.to_dict(),
            "data": {
                "dataset": "file-tiny-char",
                "tokenizer": "char",
                "vocab_size": len(itos),
                "itos": itos,
                "source_sha256": "0" * 64,
            },
        },
    )
    return directory


def samples(stdout: str) -> list[str]:
    parts = stdout.split(SEPARATOR + "\n")
    assert parts[-1] == ""
    return [p.removesuffix("\n") for p in parts[:-1]]


def test_sample_prints_vocabulary_text_and_is_deterministic(ckpt, env, capfd):
    args = ["raygpt.sample", "--checkpoint", str(ckpt), "--num-samples", "2"]
    args += ["--max-new-tokens", "20", "--seed", "1"]
    first = run(args, env)
    assert first.returncode == 0, first.stderr
    texts = samples(first.stdout)
    assert len(texts) == 2
    for text in texts:
        assert len(text) == 1 + 20  # the "\n" prompt and 20 characters
        assert set(text) <= set(TEXT)
    assert texts[0] != texts[1]
    # The same seed again, and another seed: in this process, the same command.
    again = run_main(sample.main, *args[1:], capfd=capfd, env=env)
    assert again.returncode == 0 and again.stdout == first.stdout
    other = run_main(sample.main, *args[1:-1], "2", capfd=capfd, env=env)
    assert other.returncode == 0 and other.stdout != first.stdout


def test_sample_from_run_folder_with_prompt_file(ckpt, env, tmp_path, capfd):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Speak")
    args = ["--checkpoint", str(ckpt.parent), "--start", f"FILE:{prompt}"]
    args += ["--num-samples", "1", "--max-new-tokens", "5", "--top-k", "1"]
    result = run_main(sample.main, *args, capfd=capfd, env=env)
    assert result.returncode == 0, result.stderr
    (text,) = samples(result.stdout)
    assert text.startswith("Speak") and len(text) == 10


def test_sample_unknown_prompt_character_is_one_error_line(ckpt, env, capfd):
    result = run_main(sample.main, "--checkpoint", ckpt, "--start", "Zebra", capfd=capfd, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "'Z'" in lines[0]
    assert result.stdout == ""


def test_sample_missing_checkpoint_exits_2(tmp_path, env, capfd):
    args = ["--checkpoint", "no-such-run", "--storage-path", tmp_path]
    result = run_main(sample.main, *args, capfd=capfd, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint"), result.stderr


def test_sample_needs_a_source(env, capfd):
    result = run_main(sample.main, capfd=capfd, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: give --checkpoint")


def test_bench_tiny_config_prints_tokens_per_second(tmp_path, env):
    text_file = tmp_path / "small.txt"
    text_file.write_text(TEXT * 20)
    out = tmp_path / "bench.json"
    args = ["raygpt.bench", "--data-file", str(text_file), "--n-layer", "1", "--n-embd", "32"]
    args += ["--n-head", "2", "--block-size", "16", "--batch-size", "2"]
    args += ["--bench-steps", "3", "--warmup-steps", "1", "--json", str(out)]
    result = run(args, env)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout
    assert "n/a" in result.stdout  # CPU: no MFU without --peak-tflops
    report = json.loads(out.read_text())
    (row,) = report["variants"]
    assert len(row["step_ms"]) == 3 and row["tokens_per_sec"] > 0
    assert report["tokens_per_step"] == 2 * 16


def test_bench_bad_flag_is_one_error_line(env, capfd):
    result = run_main(bench.main, "--bench-steps", "0", "--synthetic", capfd=capfd, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --bench-steps must be >= 1, got 0"]


class FakeEncoding:
    """A stand-in for tiktoken's gpt2 Encoding (offline): 101 tokens, the last one EOT."""

    name = "fake"
    max_token_value = 100
    special_tokens_set = frozenset({"<|endoftext|>"})

    def encode_single_token(self, text: str) -> int:
        return 100

    def encode(self, text: str, allowed_special=()) -> list[int]:
        return [ord(c) % 100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join("|" if i == 100 else chr(32 + i % 90) for i in ids)


def test_sample_init_from_local_gpt2_directory(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from raygpt.data import tokenizers

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=101))
    hf.save_pretrained(tmp_path / "hf")
    # Patched where it is looked up: the tokenizer module owns the loader.
    monkeypatch.setattr(tokenizers, "load_gpt2_encoding", lambda: FakeEncoding())
    argv = ["--init-from", str(tmp_path / "hf"), "--start", "", "--num-samples", "1"]
    argv += ["--max-new-tokens", "7"]
    assert sample.main(argv) == 0
    (text,) = samples(capsys.readouterr().out)
    assert text.startswith("|") and len(text) == 8  # <|endoftext|> starts an empty prompt
