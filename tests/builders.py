"""What the tests build and share: a small real tiktoken BPE, tiny checkpoints in the
training loop's format, HellaSwag items, and one-shard and resharded dataset folders."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raygpt import checkpoint
from raygpt.config.train import TrainConfig
from raygpt.data import common, prepare, sampler
from raygpt.data import manifest as data_manifest
from raygpt.data.shards import write_shard
from raygpt.model.gpt import GPT, GPTConfig

# tiktoken's GPT-2 split pattern (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

MERGES = [b"th", b"the", b" t", b"in", b"er", b" the"]


def tiny_encoding(eot_id: int | None = None, name: str = "tiny-gpt2"):
    """A real tiktoken Encoding: byte-level ranks plus a few merges and <|endoftext|>."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for token in MERGES:
        ranks[token] = len(ranks)
    eot = len(ranks) if eot_id is None else eot_id
    return tiktoken.Encoding(
        name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={common.EOT: eot}
    )


def write_text(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll: Speak, speak!\n"

# A 263-token BPE padded to 320 rows (a multiple of 64), as training pads GPT-2's 50257.
BPE_PADDED = 320


def random_gpt(config: GPTConfig, seed: int) -> GPT:
    """Weights large enough that logits differ by whole units: a transposed or misnamed
    tensor changes them far beyond the 1e-4 the exports are held to."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def make_checkpoint(
    directory: Path,
    kind: str,
    *,
    bias: bool = True,
    seed: int = 0,
    block_size: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    itos: list[str] | None = None,
    dataset: str | None = None,
    parametrization: dict | None = None,
):
    """A checkpoint folder as loop.py saves one. Returns (folder, model, data facts); the
    model is the one saved (with the padded vocabulary, for BPE). `parametrization`: its
    keys (parametrization, mup_base_width, ...), in the model and the run config."""
    if kind == "char":
        itos = itos or sorted(set(CHAR_TEXT))
        facts = {"dataset": "file-tiny-char", "tokenizer": "char", "vocab_size": len(itos)}
        facts["itos"] = itos
        vocab = len(itos)
    else:
        enc = tiny_encoding()
        vocab_size = enc.max_token_value + 1
        facts = {"dataset": "file-tiny-gpt2", "tokenizer": "gpt2", "vocab_size": vocab_size}
        facts["itos"] = None
        vocab = BPE_PADDED
    facts["source_sha256"] = "0" * 64
    facts["dataset"] = dataset or facts["dataset"]
    shape = dict(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    keys = parametrization or {}
    model = random_gpt(GPTConfig(vocab_size=vocab, bias=bias, **shape, **keys), seed)
    folder = directory / checkpoint.checkpoint_dir_name(7)
    checkpoint.save(
        folder,
        {
            "model": model.state_dict(),
            "optimizer": {},
            "scaler": {},
            "step": 7,
            "first_loss": 5.0,
            "best_val_loss": 4.0,
            "last_val_loss": 4.0,
            "config": TrainConfig(
                bias=bias, tokenizer=kind, dropout=0.1, **shape, **keys
            ).to_dict(),
            "data": facts,
            **({"model_config": dataclasses.asdict(model.config)} if keys else {}),
        },
    )
    return folder, model, facts


# Hand-written items in HellaSwag's JSONL format: an ActivityNet one (ctx_b continues
# mid-sentence), a WikiHow one with the [title] / [step] artifacts lm-eval removes, and
# one with an empty ctx_b.
ITEMS = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
    },
    {
        "ind": 7,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to fix a door [title] Find the hinge. [step] Look at it.",
        "ctx_b": "",
        "ctx": "[header] How to fix a door [title] Find the hinge. [step] Look at it. ",
        "split": "val",
        "split_type": "zeroshot",
        "label": 0,
        "endings": [
            "[substeps] Tighten  the screws.",
            "Paint the door blue [title] then wait.",
            "Eat a sandwich.",
            "Sell the house.",
        ],
        "source_id": "wikihow~1",
    },
    {
        "ind": 3,
        "activity_label": "Cooking",
        "ctx_a": "The chef cracks two eggs into a bowl.",
        "ctx_b": "the chef",
        "ctx": "The chef cracks two eggs into a bowl. the chef",
        "split": "val",
        "split_type": "indomain",
        "label": 1,
        "endings": ["flies away.", "whisks them.", "sings loudly to the eggs.", "sleeps."],
        "source_id": "activitynet~v_x",
    },
]


class TuneTrial:
    """What the sweep's Tune callbacks read of a Tune trial: its id, config and checkpoint."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id = trial_id
        self.config = config
        self.checkpoint = None


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


BS = 16


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """A one-shard dataset of 20,000 random characters: the sampler tests' data."""
    root = tmp_path_factory.mktemp("legacy")
    rng = np.random.default_rng(1)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz .,\n"), size=20_000))
    return prepare.prepare(data_file=write_text(root / "rand.txt", text), data_dir=root)


# sha256 of the batches below as raygpt's sampler over flat train.bin/val.bin files (the
# data.py this package replaced) gave them: the one-shard case must give the same.
LEGACY_BATCHES_SHA256 = "49dc46f45df9e547ac4f408da2d4f45c481def531b66d6ab907fdb8b7e507c2a"


def batches_sha256(folder) -> str:
    h = hashlib.sha256()
    for split in ("train", "val"):
        s = sampler.BatchSampler(folder, split, BS, seed=5)
        for step in (0, 1, 7, 123, 4000):
            for rank in range(2):
                for micro in range(2):
                    x, y = s.get_batch(step, rank, micro, 3, 2, 2)
                    h.update(x.numpy().tobytes())
                    h.update(y.numpy().tobytes())
        for rank in range(2):
            for x, y in s.eval_batches(5, 4, rank, 2):
                h.update(x.numpy().tobytes())
                h.update(y.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def resharded(legacy, tmp_path_factory):
    """The same tokens as `legacy`, each split cut into uneven shards (with a manifest)."""
    out = tmp_path_factory.mktemp("resharded")
    meta = data_manifest.load_meta(legacy)
    shards = {}
    for split, cuts in (("train", [0, 5000, 5001, 12345]), ("val", [0, 700])):
        tokens = np.asarray(sampler.read_tokens(legacy, split))
        bounds = [*cuts, len(tokens)]
        shards[split] = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            name = f"{split}_{i:06d}.bin"
            sha = write_shard(str(out / name), tokens[a:b], meta["dtype"])
            shards[split].append({"file": name, "tokens": b - a, "sha256": sha})
    manifest = json.loads((legacy / data_manifest.MANIFEST).read_text())
    manifest["splits"] = {
        split: {"tokens": sum(s["tokens"] for s in shards[split]), "shards": shards[split]}
        for split in shards
    }
    (out / data_manifest.MANIFEST).write_bytes(data_manifest.manifest_bytes(manifest))
    return out
