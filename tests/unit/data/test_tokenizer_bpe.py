"""A byte-level BPE trained on the data (--tokenizer bpe --vocab-size N), and JSONL data
files: preparation, a real in-process training run on them, and the trained tokenizer
reaching sample and a Hugging Face export. Offline: the text is written by the tests."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import step_rows, tiny_config

from raygpt import checkpoint, export, sample
from raygpt.data import common, prepare, sampler, tokenizers
from raygpt.data import manifest as data_manifest
from raygpt.errors import UserError
from raygpt.model import loading
from raygpt.train import cli as train_cli
from raygpt.train import driver as train_driver

WORDS = [
    *("the", "king", "queen", "said", "unto", "thee", "thou", "art", "my", "lord"),
    *("good", "night", "fair", "sweet", "love", "death", "sword", "crown", "Café", "東京", "🙂"),
]


def documents(n: int, seed: int = 0) -> list[str]:
    """Paragraphs of a small made-up language: enough repeated pairs for BPE merges and
    structure a tiny model learns in a few steps."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode("utf-8")))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def all_tokens(dataset_dir: Path) -> np.ndarray:
    return np.concatenate([sampler.read_tokens(dataset_dir, split) for split in common.SPLITS])


@pytest.fixture(scope="module")
def bpe_run(data_dir, tmp_path_factory):
    """One in-process run on a JSONL file with a 300-token BPE trained on it."""
    root = tmp_path_factory.mktemp("bpe")
    corpus = write_jsonl(root / "corpus.jsonl", documents(600))
    cfg = tiny_config(
        root / "results",
        name="bpe",
        data_file=str(corpus),
        tokenizer="bpe",
        vocab_size=300,
        in_process="true",
        n_layer=1,
        max_steps=30,
        eval_interval=15,
    )
    summary = train_driver.run(cfg)
    return root, cfg, summary


def test_bpe_run_trains_and_keeps_its_tokenizer(bpe_run):
    root, cfg, _ = bpe_run
    dataset_dir, meta = prepare.prepare_from_config(cfg)
    manifest = json.loads((Path(dataset_dir) / data_manifest.MANIFEST).read_text())
    assert manifest["tokenizer"]["tokenizer"] == "bpe"
    assert manifest["tokenizer"]["tokenizer_file"] == "tokenizer.json"
    assert meta["vocab_size"] == 300 and meta["eos_token"] == 299  # <|endoftext|> last
    bpe = tokenizers.tokenizer_from_meta(meta)
    assert (Path(dataset_dir) / "tokenizer.json").read_text() == bpe.tokenizer_json

    rows = step_rows(root / "results" / "bpe")
    assert math.log(300) - 0.5 < rows[0]["train_loss"] < math.log(300) + 0.5
    evals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert evals[-1] < rows[0]["train_loss"] - 1.0, evals
    # The checkpoint carries the tokenizer itself: sample and export need no dataset.
    state = checkpoint.load(checkpoint.latest_in_run(str(root / "results" / "bpe")))
    assert state["data"]["tokenizer"] == "bpe"
    assert tokenizers.BPETokenizer(state["data"]["tokenizer_json"]).sha256 == bpe.sha256


def test_sample_decodes_with_the_trained_bpe(bpe_run, capsys):
    root, _, _ = bpe_run
    argv = ["--checkpoint", str(root / "results" / "bpe"), "--start", "The king 🙂"]
    assert sample.main([*argv, "--num-samples", "1", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out.split(sample.SEPARATOR)[0]
    assert text.startswith("The king 🙂") and len(text) > len("The king 🙂")


def test_export_writes_the_trained_bpe_for_transformers(bpe_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _ = bpe_run
    out = root / "hf"
    assert export.main(["--checkpoint", str(root / "results" / "bpe"), "--hf", str(out)]) == 0
    ours = loading.from_checkpoint(str(root / "results" / "bpe"))
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "The king said: thou art 東京 🙂 Café<|endoftext|>Good night"
    ids = hf_tok(text)["input_ids"]
    assert ids == ours.tokenizer.encode(text)
    assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == 299
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        mine, _ = ours.model(x, torch.zeros_like(x))
        torch.testing.assert_close(hf(x).logits, mine, atol=1e-4, rtol=0)
    # raygpt reads the export back with the same tokenizer (tokenizer.json, not GPT-2's).
    back = loading.from_pretrained(str(out))
    assert back.tokenizer.kind == "bpe" and back.tokenizer.encode(text) == ids
    assert "tokenizer_json" not in json.loads((out / "raygpt.json").read_text())["data"]


def test_bpe_sizes_do_not_share_a_cache_entry_and_training_is_deterministic(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(200))
    small = prepare.prepare(
        None, data_file=corpus, tokenizer="bpe", vocab_size=257, data_dir=tmp_path
    )
    big = prepare.prepare(
        None, data_file=corpus, tokenizer="bpe", vocab_size=300, data_dir=tmp_path
    )
    assert small != big
    assert data_manifest.load_meta(small)["vocab_size"] == 257  # bytes + <|endoftext|>, no merges
    assert data_manifest.load_meta(big)["vocab_size"] == 300
    # Another machine (another cache) trains the same tokenizer, so ranks agree.
    again = prepare.prepare(
        None, data_file=corpus, tokenizer="bpe", vocab_size=300, data_dir=tmp_path / "other"
    )
    assert (again / "tokenizer.json").read_bytes() == (big / "tokenizer.json").read_bytes()


def test_vocab_size_below_the_byte_alphabet_is_one_line(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", documents(20))
    results = tmp_path / "results"
    argv = ["--data-file", str(corpus), "--tokenizer", "bpe", "--vocab-size", "200"]
    assert train_cli.main([*argv, "--storage-path", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vocab_size=200 ") and err.count("\n") == 1, err
    assert not results.exists()  # refused before anything was written
    with pytest.raises(UserError, match="vocab_size=256 "):
        prepare.prepare(None, data_file=corpus, tokenizer="bpe", vocab_size=256, data_dir=tmp_path)
    with pytest.raises(UserError, match="--vocab-size"):
        prepare.prepare(None, data_file=corpus, tokenizer="bpe", data_dir=tmp_path)
    with pytest.raises(UserError, match="bpe only"):
        prepare.prepare(None, data_file=corpus, tokenizer="char", vocab_size=300, data_dir=tmp_path)


# --------------------------------------------------------------------------- JSONL


def test_jsonl_documents_are_joined_by_the_tokenizers_separator(tmp_path):
    docs = documents(30, seed=1)
    plain = write_jsonl(tmp_path / "d.jsonl", docs)
    packed = write_jsonl(tmp_path / "d.jsonl.gz", docs)
    # Characters: documents joined by a blank line; gzip or not, the same text.
    char = prepare.prepare(None, data_file=plain, tokenizer="char", data_dir=tmp_path)
    meta = data_manifest.load_meta(char)
    text = "".join(meta["itos"][i] for i in all_tokens(char))
    assert text == common.DOC_SEPARATOR.join(docs)
    char_gz = prepare.prepare(None, data_file=packed, tokenizer="char", data_dir=tmp_path)
    assert np.array_equal(all_tokens(char_gz), all_tokens(char))
    # BPE: <|endoftext|> between documents.
    bpe_dir = prepare.prepare(
        None, data_file=plain, tokenizer="bpe", vocab_size=280, data_dir=tmp_path
    )
    bpe = tokenizers.tokenizer_from_meta(data_manifest.load_meta(bpe_dir))
    ids = all_tokens(bpe_dir)
    assert int((ids == bpe.eos_token).sum()) == len(docs) - 1
    assert bpe.decode(ids.tolist()) == common.EOT.join(docs)


@pytest.mark.parametrize(
    "lines, number, says",
    [
        (['{"text": "a b c"}', '{"title": "no text"}'], 2, 'no "text" field'),
        (['{"text": "a b c"}', "", '{"text": "unterminated'], 3, "not valid JSON"),
        (['{"text": 7}'], 1, 'a non-string "text" field'),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_number(tmp_path, lines, number, says):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as err:
        prepare.prepare(None, data_file=path, tokenizer="char", data_dir=tmp_path)
    message = str(err.value)
    assert f"{path} line {number} " in message and says in message and "\n" not in message
