"""raygpt.evals and `python -m raygpt.eval`: HellaSwag under both conventions checked
against a hand computation, the sha256 check of its download, perplexity as a sweep,
and the Ray-spread path end to end. Offline: downloads are file:// URLs, the GPT-2 BPE
is a small tiktoken encoding made in the test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_data import tiny_encoding
from test_export import make_checkpoint, random_gpt

from raygpt import data, export, trained
from raygpt import eval as eval_cli
from raygpt.errors import UserError
from raygpt.evals import hellaswag, perplexity, scoring
from raygpt.model import GPTConfig

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
# The same items rendered by hand, as build-nanogpt and lm-eval would: (context, endings).
BY_TOKENS = [(item["ctx"], [" " + e for e in item["endings"]]) for item in ITEMS]
BY_CHARS = [
    (
        "Roof shingle removal: A man is sitting on a roof. He",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    ),
    (
        "Home and Garden: How to fix a door. Find the hinge. Look at it.",
        [
            " Tighten the screws.",  # lm-eval strips before it drops "[substeps]"
            "Paint the door blue. then wait.",
            "Eat a sandwich.",
            "Sell the house.",
        ],
    ),
    (
        "Cooking: The chef cracks two eggs into a bowl. The chef",
        ["flies away.", "whisks them.", "sings loudly to the eggs.", "sleeps."],
    ),
]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def hand_logprob(model, context: list[int], continuation: list[int]) -> float:
    """sum log p(continuation | context), one unbatched forward pass, log_softmax by hand."""
    ids = torch.tensor([(context + continuation)[:-1]])  # the last token predicts nothing
    with torch.no_grad():
        logits, _ = model(ids, torch.zeros_like(ids))
    logp = logits[0].double().log_softmax(-1)
    return sum(logp[len(context) + i - 1, token].item() for i, token in enumerate(continuation))


def first_best(values: list[float]) -> int:
    return values.index(max(values))


def test_preprocess_and_render_match_the_hand_rendering():
    enc = tiny_encoding()
    tok = data.GPT2Tokenizer(enc)
    for item, (ctx, endings), (context, choices) in zip(ITEMS, BY_TOKENS, BY_CHARS, strict=True):
        r = hellaswag.render(item, tok)
        assert r.spans["tokens"] == [
            (enc.encode(ctx) + enc.encode(e), len(enc.encode(ctx))) for e in endings
        ]
        assert [s[0] for s in r.spans["chars"]] == [
            enc.encode(context) + enc.encode(context + " " + c)[len(enc.encode(context)) :]
            for c in choices
        ]
        assert r.char_lengths == [len(c) for c in choices]


def test_both_normalisations_against_a_hand_computation():
    enc = tiny_encoding()
    tok = data.GPT2Tokenizer(enc)
    model = random_gpt(GPTConfig(block_size=128, vocab_size=263, n_layer=2, n_head=2, n_embd=32), 3)
    want = {c: {"acc": 0, "acc_norm": 0} for c in hellaswag.CONVENTIONS}
    for item, (ctx, endings), (context, choices) in zip(ITEMS, BY_TOKENS, BY_CHARS, strict=True):
        ctx_ids = enc.encode(ctx)
        ends = [enc.encode(e) for e in endings]
        sums = [hand_logprob(model, ctx_ids, e) for e in ends]
        want["tokens"]["acc"] += first_best(sums) == item["label"]
        means = [s / len(e) for s, e in zip(sums, ends, strict=True)]
        want["tokens"]["acc_norm"] += first_best(means) == item["label"]

        context_ids = enc.encode(context)
        conts = [enc.encode(context + " " + c)[len(context_ids) :] for c in choices]
        lls = [hand_logprob(model, context_ids, c) for c in conts]
        want["chars"]["acc"] += first_best(lls) == item["label"]
        per_char = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        want["chars"]["acc_norm"] += first_best(per_char) == item["label"]

        # The scored spans themselves, batched and padded, equal the hand sums.
        r = hellaswag.render(item, tok)
        got = scoring.sum_logprobs(model, r.spans["tokens"] + r.spans["chars"])
        assert [s for s, _ in got] == pytest.approx(sums + lls, abs=1e-5)
        assert [n for _, n in got] == [len(e) for e in ends] + [len(c) for c in conts]

    rendered = [hellaswag.render(item, tok) for item in ITEMS]
    result = hellaswag.accuracy(rendered, scoring.sum_logprobs(model, hellaswag.spans_of(rendered)))
    assert result["examples"] == 3
    for convention in hellaswag.CONVENTIONS:
        for metric in ("acc", "acc_norm"):
            assert result[convention][metric] == want[convention][metric] / 3


def test_the_two_normalisations_can_pick_different_endings():
    # Ending 0: 2 tokens, 10 characters; ending 1: 4 tokens, 8 characters.
    r = hellaswag.Rendered(label=0, spans={}, char_lengths=[10, 8])
    scores = {"tokens": [(-10.0, 2), (-12.0, 4)], "chars": [(-10.0, 2), (-12.0, 4)]}
    picks = hellaswag.predictions(r, scores)
    assert picks["tokens"] == {"acc": 0, "acc_norm": 1}  # -10 > -12; -5 < -3 per token
    assert picks["chars"] == {"acc": 0, "acc_norm": 0}  # -1.0 > -1.5 per character
    tie = {"tokens": [(-4.0, 2), (-4.0, 2)], "chars": [(-4.0, 2), (-4.0, 2)]}
    assert hellaswag.predictions(hellaswag.Rendered(0, {}, [3, 3]), tie)["chars"]["acc"] == 0


def test_long_spans_keep_their_last_tokens():
    tokens, first = scoring.fit_to_context(np.arange(20), 15, block_size=8)
    assert tokens.tolist() == list(range(11, 20)) and first == 4
    tokens, first = scoring.fit_to_context(np.arange(20), 5, block_size=8)
    assert first == 1  # the ending's first tokens lost their place in the window


def serve(tmp_path: Path, monkeypatch, content: bytes) -> None:
    """Point the download at a file:// copy of `content` (as if upstream had changed)."""
    (tmp_path / "served_val.jsonl").write_bytes(content)
    monkeypatch.setattr(hellaswag, "URL", tmp_path.as_uri() + "/served_{split}.jsonl")


def test_wrong_sha256_is_one_clear_line(tmp_path, monkeypatch):
    serve(tmp_path, monkeypatch, write_jsonl(tmp_path / "items.jsonl", ITEMS).read_bytes())
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as caught:
        hellaswag.download("val", cache)
    message = str(caught.value)
    assert "\n" not in message and "sha256" in message and "nothing was cached" in message
    assert not (cache / "hellaswag" / "hellaswag_val.jsonl").exists()
    # A damaged file already in the cache is not trusted either.
    (cache / "hellaswag" / "hellaswag_val.jsonl").write_text("damaged\n")
    with pytest.raises(UserError, match="sha256"):
        hellaswag.download("val", cache)


def test_cli_wrong_sha256_and_bad_files_are_one_line(tmp_path, monkeypatch, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    serve(tmp_path, monkeypatch, items.read_bytes())
    folder, _, _ = make_checkpoint(tmp_path / "run", "char", bias=False)
    base = ["hellaswag", "--checkpoint", str(folder), "--data-dir", str(tmp_path / "cache")]
    assert eval_cli.main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: download from file://")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**ITEMS[0], "label": 9}) + "\n")
    assert eval_cli.main([*base, "--data-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1 has label 9" in err
    # The char vocabulary of this checkpoint lacks HellaSwag's characters: one line too.
    assert eval_cli.main([*base, "--data-file", str(items)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HellaSwag example 24: character" in err


def test_perplexity_windows_score_every_token_once():
    for n, block, stride in [(50, 8, 8), (50, 8, 3), (9, 8, 8), (10, 8, 8), (2, 8, 1)]:
        scored = []
        for start, end, first in perplexity.windows(n, block, stride):
            assert end - start <= block + 1 and first >= 1
            assert first - 1 >= (block - stride) or start == 0  # the promised context
            scored.extend(range(start + first, end))
        assert scored == list(range(1, n))
    with pytest.raises(UserError, match="stride"):
        list(perplexity.windows(10, 8, 9))


def test_perplexity_sweep_equals_a_hand_computation():
    model = random_gpt(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=16), 1)
    tokens = np.random.default_rng(0).integers(0, 11, size=30)
    got = perplexity.summary(scoring.sum_logprobs(model, perplexity.spans(tokens, 8, 8)))
    total = 0.0
    for start in range(0, 29, 8):  # windows of 9 tokens, end to end
        window = tokens[start : start + 9].tolist()
        total += hand_logprob(model, window[:1], window[1:])
    assert got["tokens_scored"] == 29
    assert got["loss"] == pytest.approx(-total / 29, abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(-total / 29), rel=1e-6)


def args_for(task: str, **values) -> SimpleNamespace:
    """The parsed flags of `python -m raygpt.eval TASK` with `values` set."""
    argv = [task]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return eval_cli.parse_args(argv)


def test_ray_spread_hellaswag_and_perplexity(ray_cluster, tmp_path, capsys):
    """Both evals through Ray: HellaSwag from a checkpoint on 2 workers, perplexity from
    its export (`--init-from DIR`); their numbers equal the same scoring done here."""
    items = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    # A char corpus holding every character the items use, prepared as training would.
    corpus = tmp_path / "corpus.txt"
    text = "".join(i["activity_label"] + i["ctx"] + "".join(i["endings"]) for i in ITEMS)
    corpus.write_text((text + " :'abcdefghijklmnopqrstuvwxyzH\n") * 3)
    data_dir = tmp_path / "data"
    dataset_dir = data.prepare(None, data_file=corpus, tokenizer="char", data_dir=data_dir)
    meta = data.load_meta(dataset_dir)
    folder, _, _ = make_checkpoint(
        tmp_path / "run", "char", block_size=64, itos=meta["itos"], dataset=meta["dataset"]
    )
    local = trained.from_checkpoint(str(folder))
    exported = export.export(local, tmp_path / "hf", overwrite=False)

    rendered = [hellaswag.render(e, local.tokenizer) for e in hellaswag.read_examples(items)]
    want = hellaswag.accuracy(
        rendered, scoring.sum_logprobs(local.model, hellaswag.spans_of(rendered))
    )
    out = tmp_path / "hellaswag.json"
    argv = ["hellaswag", "--checkpoint", str(folder), "--data-file", str(items)]
    argv += ["--num-workers", "2", "--cpus-per-worker", "1", "--output", str(out)]
    assert eval_cli.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("hellaswag val: 3 examples, acc_norm") and str(out) in line
    got = json.loads(out.read_text())
    assert got["workers"] == 2 and got["examples"] == 3
    for convention in hellaswag.CONVENTIONS:
        assert got[convention] == pytest.approx(want[convention])

    # Perplexity from the export (`--init-from DIR`): its raygpt.json names the dataset,
    # so no --data-file is needed once it is prepared; the number is the checkpoint's.
    got = eval_cli.run_perplexity(
        args_for("perplexity", init_from=exported, data_dir=data_dir, num_workers=1)
    )
    val = data.read_tokens(dataset_dir, "val")
    want = perplexity.summary(scoring.sum_logprobs(local.model, perplexity.spans(val, 64, 64)))
    assert got["tokens_scored"] == len(val) - 1 == want["tokens_scored"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
