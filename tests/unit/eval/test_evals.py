"""raygpt.eval and `python -m raygpt.eval`: HellaSwag under both conventions checked
against a hand computation, the sha256 check of its download, and perplexity as a
sweep. Offline: downloads are file:// URLs, the GPT-2 BPE is a small tiktoken encoding
made in the test. The Ray-spread path is in tests/cluster/test_evals.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import ITEMS, make_checkpoint, random_gpt, tiny_encoding, write_jsonl

from raygpt.data import tokenizers
from raygpt.errors import UserError
from raygpt.eval import driver as eval_cli
from raygpt.eval import hellaswag, perplexity, scoring
from raygpt.model.gpt import GPTConfig

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
    tok = tokenizers.GPT2Tokenizer(enc)
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
    tok = tokenizers.GPT2Tokenizer(enc)
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
