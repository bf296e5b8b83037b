"""raygpt.model.generate: prompts encoded, seeded sampling from a tiny random GPT that is
reproducible and respects max_new_tokens, top_k and the vocabulary, and training samples."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line

from raygpt.config.train import TrainConfig
from raygpt.data import tokenizers
from raygpt.errors import UserError
from raygpt.model import generate
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime

CHARS = list("\n abcdefghij")
META = {"tokenizer": "char", "itos": CHARS, "vocab_size": len(CHARS)}
CPU = Runtime(torch.device("cpu"), torch.float32, compile=False)


def _model(vocab_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=8, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg).eval()


def _sample(model, ids, n, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    return generate.generate(model, ids, n, runtime=CPU, generator=gen, **kwargs)


def test_encode_prompt():
    char = tokenizers.CharTokenizer(CHARS)
    assert generate.encode_prompt(char, "ab c") == [2, 3, 1, 4]
    with pytest.raises(UserError) as err:
        generate.encode_prompt(char, "abZ", "--sample-prompt")
    text = one_line(err)
    assert text.startswith("--sample-prompt 'abZ': ") and "'Z'" in text
    # An empty prompt has nothing to start from in a vocabulary without end-of-text.
    with pytest.raises(UserError, match="the prompt is empty; pass --start"):
        generate.encode_prompt(char, "")


def test_an_empty_prompt_starts_from_end_of_text():
    bpe = tokenizers.train_bpe(["some text to train a byte level bpe on"] * 4, 300)
    assert bpe.eos_token is not None
    assert generate.encode_prompt(bpe, "") == [bpe.eos_token]
    assert generate.encode_prompt(bpe, "some") == bpe.encode("some")


def test_same_seed_same_tokens_and_the_prompt_kept():
    model = _model()
    prompt = [1, 2, 3]
    a = _sample(model, prompt, 10, seed=7, temperature=1.0, top_k=None)
    b = _sample(model, prompt, 10, seed=7, temperature=1.0, top_k=None)
    assert a == b
    assert len(a) == len(prompt) + 10 and a[:3] == prompt
    assert all(0 <= t < 16 for t in a)
    # Another seed draws other tokens (a random model's distribution is nearly flat).
    assert _sample(model, prompt, 10, seed=8, temperature=1.0, top_k=None) != a
    assert _sample(model, prompt, 0, seed=7) == prompt
    # Longer than block_size: the context is cropped, generation goes on.
    assert len(_sample(model, prompt, 12, seed=7)) == 15


def test_top_k_one_is_greedy():
    model = _model()
    ids = [4, 5]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(torch.tensor([expected[-8:]]))
            expected.append(int(logits[0, -1].argmax()))
    # Greedy whatever the seed and temperature.
    assert _sample(model, ids, 6, seed=1, top_k=1) == expected
    assert _sample(model, ids, 6, seed=2, top_k=1, temperature=2.0) == expected


def test_vocab_size_keeps_padded_ids_out():
    model = _model(vocab_size=64)
    # Without a limit a flat 64-way distribution draws ids >= 12 almost surely in 40 draws.
    free = _sample(model, [0], 40, seed=3, temperature=5.0, top_k=None)
    assert max(free[1:]) >= 12
    limited = _sample(model, [0], 40, seed=3, temperature=5.0, top_k=None, vocab_size=12)
    assert max(limited[1:]) < 12


def test_bad_arguments_are_user_errors():
    model = _model()
    with pytest.raises(UserError, match="max_new_tokens must be >= 0"):
        _sample(model, [1], -1, seed=0)
    with pytest.raises(UserError, match="temperature must be > 0"):
        _sample(model, [1], 3, seed=0, temperature=0.0)


def test_dataset_tokenizer_names_the_flag():
    assert generate.dataset_tokenizer(META, "--x").vocab_size == len(CHARS)
    with pytest.raises(UserError) as err:
        generate.dataset_tokenizer({"tokenizer": "morse"}, "--sample-every")
    assert one_line(err).startswith("--sample-every needs the dataset's tokenizer: ")


def _cfg(tmp_path, **overrides) -> TrainConfig:
    values = dict(storage_path=str(tmp_path), sample_every=5, sample_prompt="ab", sample_tokens=6)
    return TrainConfig(**(values | overrides)).validate()


def test_training_samples_off_and_on(tmp_path):
    assert generate.TrainingSamples.from_config(_cfg(tmp_path, sample_every=0), META) is None
    samples = generate.TrainingSamples.from_config(_cfg(tmp_path, seed=11), META)
    assert (samples.prompt_ids, samples.max_new_tokens, samples.seed) == ([2, 3], 6, 11)
    with pytest.raises(UserError, match="--sample-prompt 'aZ'"):
        generate.check(_cfg(tmp_path, sample_prompt="aZ"), META)


def test_training_sample_is_the_same_text_per_step_and_keeps_training_mode(tmp_path):
    samples = generate.TrainingSamples.from_config(_cfg(tmp_path), META)
    model = _model(vocab_size=16).train()
    text = samples.sample(model, CPU, step=5)
    assert model.training  # back to training mode
    assert text.startswith("ab") and len(text) == 2 + 6
    assert set(text) <= set(CHARS)  # the padded ids 12..15 never come out
    assert samples.sample(model, CPU, step=5) == text
    # The seed is seed + step: the sample at step 5 is a sample drawn with that seed.
    ids = _sample(model.eval(), [2, 3], 6, seed=samples.seed + 5, vocab_size=len(CHARS))
    assert text == "".join(CHARS[i] for i in ids)
    model.eval()
    samples.sample(model, CPU, step=10)
    assert not model.training  # a model in eval mode stays there
