"""Tests for raygpt.model: shapes, init, causality, loading HF GPT-2 weights, generation."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from raygpt.errors import UserError
from raygpt.model import hf as hf_adapter
from raygpt.model.gpt import GPT, GPTConfig


def tiny_config(**kwargs) -> GPTConfig:
    args = {"block_size": 32, "vocab_size": 101, "n_layer": 2, "n_head": 2, "n_embd": 32}
    return GPTConfig(**(args | kwargs))


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def save_hf_gpt2(directory, fmt: str):
    """Save a small random HF GPT-2 in `fmt` and return it (in eval mode)."""
    # Here, not at the top: transformers costs ~3 s to import, and every test worker
    # collects this module while only the tests that call this need it.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf_config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=101,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    # Random init leaves LayerNorms and biases at 1/0; perturb them so a mix-up would show.
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(directory)  # config.json + model.safetensors (lm_head omitted, tied)
    if fmt == "bin":
        # transformers 5 always writes safetensors, so write the legacy .bin ourselves, with
        # lm_head.weight and the old attn.bias / attn.masked_bias buffers HF used to save.
        state = hf.state_dict()
        for i in range(hf_config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        (directory / "model.safetensors").unlink()
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "bin_no_prefix":
        # A GPT2Model (base model) checkpoint: keys without "transformer.", no lm_head.
        state = {k.removeprefix("transformer."): v for k, v in hf.transformer.state_dict().items()}
        (directory / "model.safetensors").unlink()
        torch.save(state, directory / "pytorch_model.bin")
    else:
        assert fmt == "safetensors"
    return hf


def test_forward_shapes(model):
    idx = torch.randint(0, 101, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 101)
    assert loss is None
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 20, 101)
    assert loss.shape == ()


def test_inference_logits_match_last_position_of_full_logits(model):
    idx = torch.randint(0, 101, (2, 10))
    last, _ = model(idx)
    full, _ = model(idx, targets=idx)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_loss_at_init_is_close_to_log_vocab_size(model):
    torch.manual_seed(2)
    idx = torch.randint(0, 101, (4, 32))
    targets = torch.randint(0, 101, (4, 32))
    _, loss = model(idx, targets=targets)
    assert abs(loss.item() - math.log(101)) < 0.3


def test_ignore_index_minus_one(model):
    idx = torch.randint(0, 101, (2, 8))
    targets = torch.randint(0, 101, (2, 8))
    masked = targets.clone()
    masked[:, 4:] = -1
    logits, loss = model(idx, targets=masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :4].reshape(-1, 101), targets[:, :4].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)


def test_targets_may_be_a_view_of_a_token_buffer(model):
    # nanoGPT-style batches slice x and y out of one (B, T + 1) buffer: y is not contiguous.
    buf = torch.randint(0, 101, (2, 9))
    x, y = buf[:, :-1], buf[:, 1:]
    assert not y.is_contiguous()
    _, loss = model(x, targets=y)
    _, expected = model(x.contiguous(), targets=y.contiguous())
    torch.testing.assert_close(loss, expected)


def test_weight_tying(model):
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_init_std():
    torch.manual_seed(0)
    m = GPT(tiny_config(n_layer=8, n_embd=128, n_head=4))
    assert m.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * 8)
    assert m.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert m.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert torch.count_nonzero(m.transformer.h[0].attn.c_attn.bias) == 0


def test_causality(model):
    torch.manual_seed(3)
    idx = torch.randint(0, 101, (1, 16))
    t = 7
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 101, (1, 16 - t - 1))
    assert not torch.equal(changed, idx)
    before, _ = model(idx, targets=idx)
    after, _ = model(changed, targets=changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


def test_sequence_longer_than_block_size_raises(model):
    idx = torch.zeros(1, 33, dtype=torch.long)
    with pytest.raises(UserError, match=r"33.*32"):
        model(idx)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin_no_prefix"])
def test_from_pretrained_matches_transformers(tmp_path, fmt):
    hf = save_hf_gpt2(tmp_path, fmt)
    model = hf_adapter.from_pretrained(tmp_path).eval()
    assert model.config == GPTConfig(
        block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True
    )
    assert model.transformer.wte.weight is model.lm_head.weight
    torch.manual_seed(4)
    idx = torch.randint(0, 101, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx, targets=idx)
        last, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(last[:, 0], expected[:, -1], rtol=0, atol=1e-4)


def test_from_pretrained_override_dropout(tmp_path):
    save_hf_gpt2(tmp_path, "safetensors")
    model = hf_adapter.from_pretrained(str(tmp_path), override_args={"dropout": 0.1})
    assert model.config.dropout == 0.1
    with pytest.raises(UserError, match="n_layer"):
        hf_adapter.from_pretrained(tmp_path, override_args={"n_layer": 1})


def test_from_pretrained_missing_key_names_it(tmp_path):
    save_hf_gpt2(tmp_path, "safetensors")
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, path)
    with pytest.raises(UserError, match=r"missing transformer\.h\.1\.mlp\.c_fc\.weight"):
        hf_adapter.from_pretrained(tmp_path)


def test_from_pretrained_wrong_shape_and_no_weights(tmp_path):
    save_hf_gpt2(tmp_path, "safetensors")
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["transformer.ln_f.weight"] = torch.ones(31)
    save_file(state, path)
    with pytest.raises(UserError, match=r"transformer\.ln_f\.weight \(31,\) \(expected \(32,\)\)"):
        hf_adapter.from_pretrained(tmp_path)
    path.unlink()
    with pytest.raises(UserError, match=r"neither model\.safetensors nor pytorch_model\.bin"):
        hf_adapter.from_pretrained(tmp_path)


def test_from_pretrained_hub_name_uses_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    save_hf_gpt2(tmp_path, "safetensors")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.chdir(tmp_path.parent)  # so "gpt2" is not a local directory by accident
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = hf_adapter.from_pretrained("gpt2")
    assert calls == ["gpt2"]
    assert model.config.n_embd == 32


def test_from_pretrained_offline_gives_user_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"'gpt2-medium'.*local directory") as info:
        hf_adapter.from_pretrained("gpt2-medium")
    assert "\n" not in str(info.value)


def test_from_pretrained_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        hf_adapter.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is a file"):
        hf_adapter.from_pretrained(tmp_path / "config.json")
    with pytest.raises(UserError, match="lacks n_layer"):
        hf_adapter.from_pretrained(tmp_path)


def test_generate_length(model):
    idx = torch.randint(0, 101, (2, 5))
    out = model.generate(idx, max_new_tokens=40)  # runs past block_size 32: context is cropped
    assert out.shape == (2, 45)
    assert torch.equal(out[:, :5], idx)
    assert out.min() >= 0 and out.max() < 101


def test_generate_top_k_1_is_greedy(model):
    idx = torch.randint(0, 101, (2, 5))
    out = model.generate(idx, max_new_tokens=8, top_k=1, temperature=0.7)
    greedy = idx
    for _ in range(8):
        logits, _ = model(greedy)
        greedy = torch.cat([greedy, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_generate_reproducible_with_generator(model):
    idx = torch.randint(0, 101, (2, 5))
    a = model.generate(idx, 10, top_k=20, generator=torch.Generator().manual_seed(7))
    b = model.generate(idx, 10, top_k=20, generator=torch.Generator().manual_seed(7))
    c = model.generate(idx, 10, top_k=20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_generate_nonpositive_temperature_raises(model, temperature):
    with pytest.raises(UserError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=temperature)


def test_crop_block_size(model):
    config_before = model.config
    model.crop_block_size(16)
    assert model.config.block_size == 16
    assert config_before.block_size == 32  # the original config object is not mutated
    assert model.transformer.wpe.weight.shape == (16, 32)
    logits, _ = model(torch.zeros(1, 16, dtype=torch.long), targets=torch.zeros(1, 16).long())
    assert logits.shape == (1, 16, 101)
    with pytest.raises(UserError, match="17"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="block_size"):
        model.crop_block_size(32)


def test_n_params_and_flops_per_token():
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8))
    wte = 11 * 8  # also lm_head (tied), counted once
    wpe = 16 * 8
    block = (
        (8 + 8)  # ln_1
        + (8 * 24 + 24)  # attn.c_attn
        + (8 * 8 + 8)  # attn.c_proj
        + (8 + 8)  # ln_2
        + (8 * 32 + 32)  # mlp.c_fc
        + (32 * 8 + 8)  # mlp.c_proj
    )
    assert block == 872
    ln_f = 8 + 8
    total = wte + wpe + 2 * block + ln_f
    assert total == 1976
    assert model.n_params(non_embedding=False) == total
    assert model.n_params() == total - wpe == 1848
    # 6*N + 12*L*H*Q*T with L=2 layers, H=2 heads, Q=8/2=4 head size, T=16 (block_size)
    assert model.flops_per_token() == 6 * 1848 + 12 * 2 * 2 * 4 * 16 == 14160
    assert model.flops_per_token(seq_len=8) == 6 * 1848 + 12 * 2 * 2 * 4 * 8 == 12624


def test_configure_param_groups(model):
    decay, no_decay = model.configure_param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for p in decay["params"]) + sum(p.numel() for p in no_decay["params"])
    assert n == model.n_params(non_embedding=False)  # every parameter once, tied ones too
    torch.optim.AdamW(model.configure_param_groups(0.1), lr=1e-3)  # usable as-is


def test_bad_config_names_both_numbers():
    with pytest.raises(UserError, match=r"n_embd \(100\).*n_head \(12\)") as info:
        GPT(GPTConfig(n_embd=100, n_head=12, n_layer=1))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        GPT(tiny_config(**kwargs))
