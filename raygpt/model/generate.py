"""Text from a model and its tokenizer: a prompt in, a sample out.

`python -m raygpt.sample` (one-shot and --interactive) and the samples rank 0 shows
every `sample_every` steps during training take the same steps: encode the prompt
(an empty one starts from end-of-text where the tokenizer has one), sample with a
temperature and top-k from a seeded generator, decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raygpt.data import tokenizers
from raygpt.errors import UserError
from raygpt.runtime import Runtime

# sample.py's defaults (nanoGPT's sample.py): a little sharper than the model's own
# distribution, and never the long tail.
TEMPERATURE = 0.8
TOP_K = 200


def encode_prompt(tokenizer: Any, prompt: str, flag: str = "--start") -> list[int]:
    """The prompt's token ids; a character outside a char vocabulary is a UserError
    naming it. `flag` names where the prompt came from in the message."""
    try:
        ids = tokenizer.encode(prompt)
    except UserError as err:
        raise UserError(f"{flag} {prompt!r}: {err}") from None
    if ids:
        return ids
    if tokenizer.eos_token is not None:
        return [tokenizer.eos_token]  # GPT-2 starts documents after <|endoftext|>
    raise UserError(f"the prompt is empty; pass {flag} with at least one character")


def generate(
    model: Any,
    ids: list[int],
    max_new_tokens: int,
    *,
    runtime: Runtime,
    generator: torch.Generator,
    vocab_size: int | None = None,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
) -> list[int]:
    """The prompt's ids followed by max_new_tokens sampled ones (model on runtime.device,
    in eval mode). `vocab_size` keeps a padded vocabulary's extra ids out."""
    x = torch.tensor(ids, dtype=torch.long, device=runtime.device)[None, :]
    with torch.no_grad(), runtime.autocast():
        y = model.generate(
            x,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            vocab_size=vocab_size,
        )
    return y[0].tolist()


def dataset_tokenizer(meta: dict[str, Any], flag: str) -> Any:
    """The tokenizer a prepared dataset records, or one line saying why `flag` needs it."""
    try:
        return tokenizers.tokenizer_from_meta(meta)
    except UserError as err:
        raise UserError(f"{flag} needs the dataset's tokenizer: {err}") from None


@dataclass
class TrainingSamples:
    """What rank 0 samples every `sample_every` steps of training: the prompt in the
    dataset's tokenizer, the length and a seed per step (the same text for the same
    weights, and no draw from the training RNG)."""

    tokenizer: Any
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int

    @classmethod
    def from_config(cls, cfg: Any, meta: dict[str, Any]) -> TrainingSamples | None:
        """None when sampling is off. Raises the UserError bad input makes: the driver
        calls this before Ray starts (`check`), rank 0 again in the loop."""
        if not cfg.sample_every:
            return None
        tokenizer = dataset_tokenizer(meta, "--sample-every")
        ids = encode_prompt(tokenizer, cfg.sample_prompt, "--sample-prompt")
        return cls(tokenizer, ids, cfg.sample_tokens, cfg.seed)

    def sample(self, model: torch.nn.Module, runtime: Runtime, step: int) -> str:
        """The prompt and its continuation by `model` (the bare GPT, not a DDP or compiled
        wrapper) as it is at `step`; the model goes back to training mode after."""
        generator = torch.Generator(device=runtime.device).manual_seed(self.seed + step)
        was_training = model.training
        model.eval()
        try:
            ids = generate(
                model,
                self.prompt_ids,
                self.max_new_tokens,
                runtime=runtime,
                generator=generator,
                vocab_size=self.tokenizer.vocab_size,
            )
        finally:
            model.train(was_training)
        return self.tokenizer.decode(ids)


def check(cfg: Any, meta: dict[str, Any]) -> None:
    """Before Ray starts: a prompt the dataset's tokenizer cannot encode is one line."""
    TrainingSamples.from_config(cfg, meta)
