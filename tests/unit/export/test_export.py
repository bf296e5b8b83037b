"""raygpt.export: Hugging Face GPT-2 directories that transformers, raygpt and
lm-evaluation-harness load, from checkpoints built here in the training loop's format
(a tiny GPT with random weights, no training run). Offline: the GPT-2 BPE is a small
real tiktoken encoding made in the test."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from builders import BPE_PADDED, CHAR_TEXT, make_checkpoint, tiny_encoding

from raygpt import checkpoint, export
from raygpt.errors import UserError
from raygpt.model import hf as hf_adapter
from raygpt.model import loading
from raygpt.model.gpt import GPT

BPE_TEXT = "the theory: the thin thread in winter. Café 東京 🙂\n\n  they're"


def load(folder: Path, kind: str) -> loading.Trained:
    return loading.from_checkpoint(
        str(folder), encoding=tiny_encoding() if kind == "gpt2" else None
    )


def text_of(kind: str) -> str:
    return CHAR_TEXT if kind == "char" else BPE_TEXT


@pytest.fixture(scope="module", params=["char", "gpt2"])
def exported(request, tmp_path_factory):
    """(kind, saved model, raygpt's view of the checkpoint, exported directory)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"export-{kind}")
    # The char model is trained without biases (zeros are written), the BPE one with.
    folder, model, _ = make_checkpoint(root / "run", kind, bias=kind != "char")
    t = load(folder, kind)
    directory = export.export(t, root / "hf", overwrite=False)
    return kind, model, t, directory


def test_directory_holds_the_hugging_face_files(exported):
    kind, model, t, directory = exported
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "raygpt.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == t.tokenizer.vocab_size  # padding cut: 320 -> 263
    assert config["eos_token_id"] == (None if kind == "char" else t.tokenizer.eos_token)
    assert config["resid_pdrop"] == 0.1
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied
    assert weights["transformer.wte.weight"].shape[0] == t.tokenizer.vocab_size
    c_fc = weights["transformer.h.0.mlp.c_fc.weight"]
    assert tuple(c_fc.shape) == (32, 128)  # Conv1D: (in, out)
    assert torch.equal(c_fc, model.transformer.h[0].mlp.c_fc.weight.detach().t())
    if kind == "char":  # bias=False: zeros
        assert not weights["transformer.h.0.attn.c_attn.bias"].any()
        assert not weights["transformer.ln_f.bias"].any()
    assert json.loads((directory / "raygpt.json").read_text())["data"] == t.data


def test_transformers_logits_match_raygpt(exported):
    from transformers import GPT2LMHeadModel

    kind, model, t, directory = exported
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    ids = torch.tensor([t.tokenizer.encode(text_of(kind))[:32]])
    with torch.no_grad():
        theirs = hf(ids).logits
        ours, _ = model(ids, torch.zeros_like(ids))
    vocab = t.tokenizer.vocab_size
    assert theirs.shape == (1, ids.shape[1], vocab)
    if kind == "gpt2":
        assert ours.shape[-1] == BPE_PADDED  # the saved model really had padding rows
    torch.testing.assert_close(theirs, ours[..., :vocab], atol=1e-4, rtol=0)


def test_from_pretrained_round_trips(exported):
    kind, model, t, directory = exported
    again = hf_adapter.from_pretrained(directory).eval()
    ids = torch.tensor([t.tokenizer.encode(text_of(kind))[:32]])
    with torch.no_grad():
        theirs, _ = again(ids, torch.zeros_like(ids))
        ours, _ = model(ids, torch.zeros_like(ids))
    torch.testing.assert_close(theirs, ours[..., : t.tokenizer.vocab_size], atol=1e-4, rtol=0)
    # raygpt's own loader of an exported directory: the checkpoint's tokenizer, not GPT-2's.
    back = loading.from_pretrained(str(directory), encoding=tiny_encoding())
    assert back.tokenizer.kind == kind
    assert back.tokenizer.encode(text_of(kind)) == t.tokenizer.encode(text_of(kind))
    assert back.step == 7


def test_transformers_tokenizer_encodes_like_raygpt(exported):
    from transformers import AutoTokenizer

    kind, _, t, directory = exported
    tok = AutoTokenizer.from_pretrained(directory)
    text = text_of(kind) + ("<|endoftext|>the end" if kind == "gpt2" else "")
    ids = tok(text)["input_ids"]
    assert ids == t.tokenizer.encode(text)
    assert tok.decode(ids) == text
    if kind == "gpt2":
        assert tok.eos_token_id == t.tokenizer.eos_token


# Every multiplier away from 1, at a width and depth away from the base: a multiplier
# left out of the export changes the logits far beyond 1e-4.
PARAMETRIZED = dict(
    mup_base_width=16,
    mup_base_depth=1,
    mup_input_alpha=1.7,
    mup_output_alpha=0.6,
    mup_attn_alpha=2.5,
)


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_parametrized_model_exports_its_multipliers_folded_in(tmp_path, parametrization, bias):
    """mup / completep: transformers' GPT2LMHeadModel and raygpt's own from_pretrained of
    the export give the checkpoint's logits within 1e-4, the head still tied."""
    from transformers import GPT2LMHeadModel

    keys = {"parametrization": parametrization, **PARAMETRIZED}
    folder, model, _ = make_checkpoint(
        tmp_path / "run", "char", bias=bias, n_layer=3, parametrization=keys
    )
    t = load(folder, "char")
    assert t.model.config.parametrization == parametrization  # rebuilt from the checkpoint
    assert t.model.config.mup_attn_alpha == 2.5
    directory = export.export(t, tmp_path / "hf", overwrite=False)
    assert json.loads((directory / "raygpt.json").read_text())["parametrization"] == (
        parametrization
    )
    ids = torch.tensor([t.tokenizer.encode(CHAR_TEXT)[:32]])
    hf = GPT2LMHeadModel.from_pretrained(directory).eval()
    assert hf.lm_head.weight is hf.transformer.wte.weight
    again = hf_adapter.from_pretrained(directory).eval()
    assert again.config.parametrization == "sp"
    with torch.no_grad():
        ours, _ = model(ids, torch.zeros_like(ids))
        unfolded = GPT(dataclasses.replace(model.config, parametrization="sp")).eval()
        unfolded.load_state_dict(model.state_dict())
        plain, _ = unfolded(ids, torch.zeros_like(ids))
        theirs = hf(ids).logits
        round_trip, _ = again(ids, torch.zeros_like(ids))
    assert (plain - ours).abs().max() > 0.1  # the multipliers matter at this size
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(round_trip, ours, atol=1e-4, rtol=0)


def test_export_refuses_a_nonempty_directory_unless_overwrite(tmp_path, capsys):
    folder, _, _ = make_checkpoint(tmp_path / "run", "char", bias=False)
    target = tmp_path / "hf"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert export.main(["--checkpoint", str(folder), "--hf", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert (target / "keep.txt").read_text() == "mine"

    # --overwrite replaces only an earlier export (raygpt.json): not a folder of other files.
    assert export.main(["--checkpoint", str(folder), "--hf", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raygpt did not export" in err
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]

    earlier = tmp_path / "earlier"
    for overwrite in ([], ["--overwrite"]):
        assert export.main(["--checkpoint", str(folder), "--hf", str(earlier), *overwrite]) == 0
        assert "exported" in capsys.readouterr().out
    assert (earlier / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_of_a_damaged_checkpoint_is_one_line(tmp_path):
    folder, _, _ = make_checkpoint(tmp_path / "run", "char", bias=False)
    state = folder / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.export", "--checkpoint", str(folder), "--hf", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: checkpoint ")
    assert "damaged" in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_converts_wrongly_is_refused(monkeypatch):
    class Shifted:  # a tokenizer whose ids disagree with the vocabulary it names
        kind, itos, eos_token = "char", ["a", "b"], None

        def encode(self, text):
            return [1 - "ab".index(c) for c in text]

    with pytest.raises(UserError, match="encodes a probe text differently"):
        export.hf_tokenizer(Shifted())


def lm_eval_available() -> str | None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        return f"lm-evaluation-harness is not installed ({err})"
    return None


@pytest.mark.skipif(lm_eval_available() is not None, reason=str(lm_eval_available()))
def test_lm_eval_scores_the_export_like_raygpt(tmp_path):
    """lm-evaluation-harness loads the exported GPT-2 BPE model through transformers and
    scores a local copy of its own hellaswag task; its per-ending log-likelihoods and
    accuracies agree with raygpt's "chars" convention on the same items."""
    from builders import ITEMS, write_jsonl

    from raygpt.eval import hellaswag, scoring

    folder, _, _ = make_checkpoint(tmp_path / "run", "gpt2", block_size=128)
    t = load(folder, "gpt2")
    directory = export.export(t, tmp_path / "hf", overwrite=False)
    items = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # lm-eval's hellaswag task, only its data local: same process_docs, same metrics.
    (tasks / "utils.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
    )
    (tasks / "local_hellaswag.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: local_hellaswag
            dataset_path: json
            dataset_kwargs:
              data_files:
                validation: {items}
            output_type: multiple_choice
            validation_split: validation
            process_docs: !function utils.process_docs
            doc_to_text: "{{{{query}}}}"
            doc_to_target: "{{{{label}}}}"
            doc_to_choice: "choices"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """
        )
    )
    script = textwrap.dedent(
        f"""\
        import json, lm_eval
        from lm_eval.tasks import TaskManager
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args="pretrained={directory},dtype=float32",
            tasks=["local_hellaswag"],
            task_manager=TaskManager(include_path="{tasks}", include_defaults=False),
            device="cpu",
            batch_size=1,
            log_samples=True,
        )
        samples = out["samples"]["local_hellaswag"]
        print(json.dumps({{
            "results": out["results"]["local_hellaswag"],
            "lls": {{s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples}},
        }}))
        """
    )
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    examples = hellaswag.read_examples(items)
    rendered = [hellaswag.render(e, t.tokenizer) for e in examples]
    spans = [s for r in rendered for s in r.spans["chars"]]
    ours = scoring.sum_logprobs(t.model, spans)
    for doc_id, lls in report["lls"].items():
        mine = [s for s, _ in ours[int(doc_id) * 4 : int(doc_id) * 4 + 4]]
        assert lls == pytest.approx(mine, abs=1e-4)
    flat = scoring.sum_logprobs(t.model, hellaswag.spans_of(rendered))
    accuracy = hellaswag.accuracy(rendered, flat)
    assert report["results"]["acc,none"] == pytest.approx(accuracy["chars"]["acc"])
    assert report["results"]["acc_norm,none"] == pytest.approx(accuracy["chars"]["acc_norm"])
