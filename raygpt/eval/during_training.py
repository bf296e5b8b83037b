"""HellaSwag on the live model during training (`hellaswag_every`), as llm.c does.

Every rank scores its share of the first `hellaswag_limit` validation examples with
the in-memory model (scoring.sum_logprobs, the call `raygpt.eval` makes), and one
all-reduce of (correct, scored) gives acc_norm. The number is the build-nanogpt/llm.c
convention ("tokens": mean log-probability per ending token), the one their training
logs show; `python -m raygpt.eval hellaswag` gives both conventions for a checkpoint.

The data is the val split, downloaded once into the data cache and checked by sha256
(hellaswag.download), or `hellaswag_file`, a local JSONL in the same format. The
driver reads and renders it before Ray starts (`check`), so a failed download or an
unreadable file is one line, not a worker's traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raygpt.errors import UserError
from raygpt.eval import hellaswag, scoring
from raygpt.model import generate
from raygpt.runtime import Runtime

CONVENTION = "tokens"


def examples_path(cfg: Any) -> Path:
    if cfg.hellaswag_file is not None:
        return Path(cfg.hellaswag_file)
    return hellaswag.download("val", cfg.data_dir)


def render_all(
    examples: list[dict[str, Any]], tokenizer: Any
) -> tuple[list[hellaswag.Rendered], int]:
    """The examples the tokenizer can write, rendered, and how many it cannot (a
    character-level vocabulary lacks most of HellaSwag's characters: those are left out
    rather than scored as wrong)."""
    rendered, skipped = [], 0
    for example in examples:
        try:
            rendered.append(hellaswag.render(example, tokenizer))
        except UserError:
            skipped += 1
    return rendered, skipped


@dataclass
class HellaSwagProbe:
    """One rank's share of the examples, ready to score."""

    rendered: list[hellaswag.Rendered]  # this rank's examples
    examples: int  # scored across all ranks
    skipped: int  # the tokenizer cannot write them, across all ranks
    world_size: int

    @classmethod
    def from_config(
        cls, cfg: Any, meta: dict[str, Any], rank: int = 0, world_size: int = 1
    ) -> HellaSwagProbe | None:
        """None when the probe is off. Every rank reads the same examples and keeps every
        world_size-th one, so the shares are disjoint and need no communication."""
        if not cfg.hellaswag_every:
            return None
        tokenizer = generate.dataset_tokenizer(meta, "--hellaswag-every")
        path = examples_path(cfg)
        examples = hellaswag.read_examples(path, cfg.hellaswag_limit)
        rendered, skipped = render_all(examples, tokenizer)
        if not rendered:
            raise UserError(
                f"none of the {len(examples)} HellaSwag examples in {path} can be written in "
                f"this dataset's vocabulary ({tokenizer.vocab_size} {tokenizer.kind} tokens); "
                "train with --tokenizer gpt2 or drop --hellaswag-every"
            )
        mine = rendered[rank::world_size]
        return cls(mine, len(rendered), skipped, world_size)

    def describe(self, every: int) -> str:
        left_out = f" ({self.skipped} left out: outside the vocabulary)" if self.skipped else ""
        return (
            f"[raygpt] hellaswag: acc_norm of {self.examples} val examples every {every} "
            f"steps{left_out}"
        )

    def score(self, model: torch.nn.Module, runtime: Runtime) -> float:
        """acc_norm of the bare GPT (not a DDP or compiled wrapper: spans vary in length)
        as it is now. Every rank must call it; it leaves the model in training mode."""
        was_training = model.training
        model.eval()
        try:
            flat = scoring.sum_logprobs(model, hellaswag.spans_of(self.rendered), runtime=runtime)
        finally:
            model.train(was_training)
        # Only this rank's examples: accuracy() over its share, turned back into counts.
        mine = hellaswag.accuracy(self.rendered, flat) if self.rendered else None
        correct = round(mine[CONVENTION]["acc_norm"] * len(self.rendered)) if mine else 0
        counts = torch.tensor([correct, len(self.rendered)], dtype=torch.float64)
        if self.world_size > 1:
            counts = counts.to(runtime.device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct_all, scored = counts.tolist()
        return correct_all / scored


def check(cfg: Any, meta: dict[str, Any]) -> None:
    """Before Ray starts: download (once) and render the examples, so a failed download,
    a bad file or a vocabulary that fits none of them is one line."""
    HellaSwagProbe.from_config(cfg, meta)
