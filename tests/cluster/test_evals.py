"""`python -m raygpt.eval` spread over a Ray cluster's scorers: HellaSwag and perplexity
give the numbers the one-process path gives (tests/unit/eval/test_evals.py).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from builders import ITEMS, make_checkpoint, write_jsonl

from raygpt import export
from raygpt.data import manifest, prepare, sampler
from raygpt.eval import driver as eval_cli
from raygpt.eval import hellaswag, perplexity, scoring
from raygpt.model import loading


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
    dataset_dir = prepare.prepare(None, data_file=corpus, tokenizer="char", data_dir=data_dir)
    meta = manifest.load_meta(dataset_dir)
    folder, _, _ = make_checkpoint(
        tmp_path / "run", "char", block_size=64, itos=meta["itos"], dataset=meta["dataset"]
    )
    local = loading.from_checkpoint(str(folder))
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
    val = sampler.read_tokens(dataset_dir, "val")
    want = perplexity.summary(scoring.sum_logprobs(local.model, perplexity.spans(val, 64, 64)))
    assert got["tokens_scored"] == len(val) - 1 == want["tokens_scored"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
