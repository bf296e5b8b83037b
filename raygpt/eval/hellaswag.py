"""HellaSwag: pick the likeliest of four endings, under both published conventions.

The data is the original JSONL of github.com/rowanz/hellaswag, downloaded once into the
data cache and checked by size and sha256 (`sources.download`, as for Tiny Shakespeare).

Each example is scored twice, because the two numbers people quote for GPT-2 124M come
from different renderings, not only different normalisations:

- "tokens" (build-nanogpt's hellaswag.py, llm.c; 124M: acc 0.2859, acc_norm 0.2955):
  context = `ctx` as is, continuation = " " + ending, tokenized apart and concatenated;
  acc_norm picks the highest mean log-probability per continuation token.
- "chars" (lm-evaluation-harness's hellaswag task; 124M: acc 0.2892, acc_norm 0.3114):
  context = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
  continuation = " " + preprocess(ending); the continuation's tokens are those of
  tokenize(context + continuation) after the context's own tokens; acc_norm divides the
  log-likelihood by len(preprocess(ending)) in characters (no leading space).

acc (both) picks the highest summed log-likelihood. Ties go to the first ending, as
numpy's argmax and build-nanogpt's argmin do.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygpt.data import cache, sources
from raygpt.errors import UserError

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
# Sizes and sha256 of the upstream files (unchanged since the 2019 initial commit). The
# test split has no labels, so it cannot be scored.
FILES = {
    "val": (12_246_618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"),
    "train": (47_496_131, "dae5e69249868cb9fe4e23ff925c60b66169564cfb7072d793cd7356a2b69f8d"),
}
SPLITS = tuple(FILES)
CONVENTIONS = ("tokens", "chars")


def download(split: str = "val", data_dir: str | Path | None = None) -> Path:
    """The split's JSONL in <data cache>/hellaswag/, fetched on first use."""
    if split not in FILES:
        raise UserError(
            f"unknown HellaSwag split {split!r}; use one of {', '.join(SPLITS)} "
            "(the test split has no labels)"
        )
    size, sha256 = FILES[split]
    dest = cache.data_root(data_dir) / "hellaswag" / f"hellaswag_{split}.jsonl"
    return sources.download(URL.format(split=split), dest, sha256=sha256, size=size)


# --------------------------------------------------------------------------- examples


def read_examples(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The examples of a HellaSwag JSONL file (the first `limit`), checked field by field."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read HellaSwag file {path} ({type(err).__name__})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path} line {number}"
        try:
            example = json.loads(line)
        except ValueError as err:
            raise UserError(f"{where} is not JSON ({err})") from None
        _check_example(example, where)
        examples.append(example)
    if not examples:
        raise UserError(f"HellaSwag file {path} holds no examples")
    return examples


def _check_example(example: Any, where: str) -> None:
    if not isinstance(example, dict):
        raise UserError(f"{where} is not a JSON object")
    for key in ("ctx", "ctx_a", "ctx_b", "activity_label"):
        if not isinstance(example.get(key), str):
            raise UserError(f"{where} lacks the text field {key!r}")
    endings = example.get("endings")
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) for e in endings)
    ):
        raise UserError(f"{where} needs 'endings': a list of at least two strings")
    label = example.get("label")
    if isinstance(label, str) and label.isdigit():  # the hub's copy stores it as text
        label = example["label"] = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise UserError(
            f"{where} has label {label!r}, not an index into its {len(endings)} endings "
            "(the test split has no labels)"
        )


# --------------------------------------------------------------------------- rendering


def preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up: the brackets are WikiHow artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


@dataclass
class Rendered:
    """One example as token spans (see scoring.py): `spans[convention][i]` is ending i."""

    label: int
    spans: dict[str, list[tuple[list[int], int]]]
    char_lengths: list[int]  # len(preprocess(ending)): the "chars" normaliser


def render(example: dict[str, Any], tokenizer: Any) -> Rendered:
    """Both conventions' spans for one example (see the module docstring)."""
    endings = example["endings"]

    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except UserError as err:  # a character a char-level vocabulary lacks
            raise UserError(f"HellaSwag example {example.get('ind', '?')}: {err}") from None

    def context_ids(text: str) -> list[int]:
        ids = encode(text)
        if ids:
            return ids
        if tokenizer.eos_token is None:
            raise UserError(
                f"HellaSwag example {example.get('ind', '?')} has an empty context and the "
                "tokenizer no end-of-text token to start from"
            )
        return [tokenizer.eos_token]  # lm-evaluation-harness's prefix for an empty context

    # build-nanogpt / llm.c
    ctx = context_ids(example["ctx"])
    by_tokens = [(ctx + encode(" " + ending), len(ctx)) for ending in endings]

    # lm-evaluation-harness: hellaswag/utils.py process_docs, then _encode_pair
    context = preprocess(example["activity_label"] + ": " + _ctx(example))
    choices = [preprocess(ending) for ending in endings]
    by_chars = []
    for choice in choices:
        text, continuation = context, " " + choice
        spaces = len(text) - len(text.rstrip())
        if spaces:  # trailing spaces move to the continuation, as the harness does
            text, continuation = text[:-spaces], text[-spaces:] + continuation
        context_tokens = context_ids(text)
        whole = encode(text + continuation)
        by_chars.append((context_tokens + whole[len(context_tokens) :], len(context_tokens)))
    return Rendered(
        label=int(example["label"]),
        spans={"tokens": by_tokens, "chars": by_chars},
        char_lengths=[len(c) for c in choices],
    )


def _ctx(example: dict[str, Any]) -> str:
    return example["ctx_a"] + " " + example["ctx_b"].capitalize()


# --------------------------------------------------------------------------- accuracy


def spans_of(rendered: list[Rendered]) -> list[tuple[list[int], int]]:
    """Every span of every example, flat: example by example, convention by convention."""
    return [span for r in rendered for c in CONVENTIONS for span in r.spans[c]]


def predictions(
    r: Rendered, scores: dict[str, list[tuple[float, int]]]
) -> dict[str, dict[str, int]]:
    """Index of the chosen ending, per convention and metric, from (logprob sum, tokens)."""
    out = {}
    for convention in CONVENTIONS:
        sums = [s for s, _ in scores[convention]]
        lengths = [n for _, n in scores[convention]] if convention == "tokens" else r.char_lengths
        normalised = [s / n if n else -math.inf for s, n in zip(sums, lengths, strict=True)]
        out[convention] = {"acc": _argmax(sums), "acc_norm": _argmax(normalised)}
    return out


def accuracy(rendered: list[Rendered], flat_scores: list[tuple[float, int]]) -> dict[str, Any]:
    """acc and acc_norm under both conventions; `flat_scores` in `spans_of` order."""
    if len(flat_scores) != len(spans_of(rendered)):
        raise ValueError("one score per span is needed")
    correct = {c: {"acc": 0, "acc_norm": 0} for c in CONVENTIONS}
    position = 0
    for r in rendered:
        scores = {}
        for convention in CONVENTIONS:
            n = len(r.spans[convention])
            scores[convention] = flat_scores[position : position + n]
            position += n
        for convention, picks in predictions(r, scores).items():
            for metric, pick in picks.items():
                correct[convention][metric] += int(pick == r.label)
    n = len(rendered)
    return {
        "examples": n,
        **{c: {m: correct[c][m] / n for m in ("acc", "acc_norm")} for c in CONVENTIONS},
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))
