"""raygpt.eval.during_training: the HellaSwag probe of the live model, from a local JSONL
(never a download): examples outside the vocabulary left out, ranks' shares disjoint, and
a score equal to hellaswag.accuracy's acc_norm of the same model."""

from __future__ import annotations

import json
import string

import pytest
import torch
from conftest import one_line

from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.eval import during_training, hellaswag, scoring
from raygpt.eval.during_training import HellaSwagProbe
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime

ITOS = sorted(set(string.ascii_letters + " .:,"))
META = {"tokenizer": "char", "itos": ITOS, "vocab_size": len(ITOS)}
CPU = Runtime(torch.device("cpu"), torch.float32, compile=False)


def _example(i: int, ending_word: str = "away") -> dict:
    return {
        "ind": i,
        "activity_label": "Cooking",
        "ctx": f"a cook stirs pot {i}. then",
        "ctx_a": f"a cook stirs pot {i}.",
        "ctx_b": "then",
        "endings": [f"walks {ending_word}.", "sings loudly.", "eats soup.", "sleeps."],
        "label": i % 4,
    }


def _write(tmp_path, examples) -> str:
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)


def _cfg(tmp_path, file, **overrides) -> TrainConfig:
    values = dict(
        storage_path=str(tmp_path), hellaswag_every=10, hellaswag_file=file, hellaswag_limit=200
    )
    return TrainConfig(**(values | overrides)).validate()


def _model() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=len(ITOS), n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg)


def _examples(n_good: int, n_bad: int) -> list[dict]:
    """n_good examples the char vocabulary can write, then n_bad it cannot (ITOS has no
    digits and no accented letters)."""
    good = []
    for i in range(n_good):
        e = _example(i)
        e["ctx"] = e["ctx_a"] = f"a cook stirs pot {string.ascii_lowercase[i]}."
        good.append(e)
    bad = [_example(100 + i, ending_word="\u00e9t\u00e9") for i in range(n_bad)]
    return good + bad


def test_render_all_leaves_out_examples_outside_the_vocabulary():
    tok = during_training.generate.dataset_tokenizer(META, "--hellaswag-every")
    rendered, skipped = during_training.render_all(_examples(3, 2), tok)
    assert (len(rendered), skipped) == (3, 2)
    assert [r.label for r in rendered] == [0, 1, 2]


def test_probe_off_and_examples_path(tmp_path):
    file = _write(tmp_path, _examples(2, 0))
    assert HellaSwagProbe.from_config(_cfg(tmp_path, file, hellaswag_every=0), META) is None
    assert str(during_training.examples_path(_cfg(tmp_path, file))) == file


def test_ranks_share_the_examples_disjointly(tmp_path):
    file = _write(tmp_path, _examples(5, 2))
    cfg = _cfg(tmp_path, file)
    probes = [HellaSwagProbe.from_config(cfg, META, rank, 2) for rank in (0, 1)]
    assert [len(p.rendered) for p in probes] == [3, 2]  # every 2nd example, from its rank
    assert all((p.examples, p.skipped, p.world_size) == (5, 2, 2) for p in probes)
    labels = sorted(r.label for p in probes for r in p.rendered)
    assert labels == sorted(i % 4 for i in range(5))
    assert probes[0].describe(10) == (
        "[raygpt] hellaswag: acc_norm of 5 val examples every 10 steps "
        "(2 left out: outside the vocabulary)"
    )
    # hellaswag_limit takes the first N examples of the file.
    limited = HellaSwagProbe.from_config(_cfg(tmp_path, file, hellaswag_limit=2), META)
    assert (limited.examples, limited.skipped) == (2, 0)
    assert "left out" not in limited.describe(10)


def test_a_vocabulary_that_fits_no_example_is_one_line_before_training(tmp_path):
    file = _write(tmp_path, _examples(0, 3))
    with pytest.raises(UserError) as err:
        during_training.check(_cfg(tmp_path, file), META)
    text = one_line(err)
    assert f"none of the 3 HellaSwag examples in {file}" in text
    assert f"({len(ITOS)} char tokens)" in text and "--tokenizer gpt2" in text


def test_score_is_acc_norm_of_the_model_and_keeps_its_mode(tmp_path):
    file = _write(tmp_path, _examples(6, 1))
    probe = HellaSwagProbe.from_config(_cfg(tmp_path, file), META)
    model = _model().train()
    got = probe.score(model, CPU)
    assert model.training
    model.eval()
    flat = scoring.sum_logprobs(model, hellaswag.spans_of(probe.rendered), runtime=CPU)
    expected = hellaswag.accuracy(probe.rendered, flat)["tokens"]["acc_norm"]
    assert got == pytest.approx(expected)
    assert 0.0 <= got <= 1.0
    assert probe.score(model, CPU) == got  # the same weights, the same score
    assert not model.training
