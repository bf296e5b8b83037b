"""Parametrizations (model/parametrization.py): sp unchanged, mup's and completep's init,
forward multipliers and per-group optimizer multipliers by hand, on two widths; resumes
that equal an uninterrupted run; checkpoints, --init-from and resumes that keep the
parametrization; and the docs holding the code's own table (no Ray cluster)."""

from __future__ import annotations

import dataclasses
import io
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_IN_PROCESS, step_rows

from raygpt import checkpoint
from raygpt.config.choices import OPTIMIZERS, PARAMETRIZATION_KEYS, PARAMETRIZATION_UNSETTLED
from raygpt.config.io import flag_name
from raygpt.config.train import TrainConfig, load_train_config
from raygpt.errors import UserError
from raygpt.model import init_from, loading
from raygpt.model import parametrization as P
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.sweep.space import parse_search_space
from raygpt.train import cli as train_cli
from raygpt.train.lr_schedule import lr_at
from raygpt.train.optim import build_optimizer, load_state, set_lr, set_optimizer_mode

VOCAB, BLOCK = 48, 16
BASE_WIDTH = 32
ADAM_TYPE = ("adamw", "adam", "adagrad", "lion", "adamw_schedulefree")


pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(parametrization: str = "sp", n_embd: int = 32, n_layer: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = GPTConfig(
        block_size=BLOCK,
        vocab_size=VOCAB,
        n_layer=n_layer,
        n_head=2,
        n_embd=n_embd,
        parametrization=parametrization,
        mup_base_width=BASE_WIDTH,
        mup_base_depth=1,
        **kw,
    )
    return GPT(config)


def _cfg(optimizer: str, parametrization: str = "mup", **kw) -> TrainConfig:
    values = dict(
        optimizer=optimizer,
        parametrization=parametrization,
        mup_base_width=BASE_WIDTH,
        mup_base_depth=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=4,
        max_steps=10,
    )
    return TrainConfig(**{**values, **kw}).validate()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _names(model: GPT, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


# --------------------------------------------------------------------------- sp unchanged


def test_sp_is_nanogpts_init_forward_and_groups():
    """sp draws the same numbers as nanoGPT's init, computes no multiplier, and gets the
    two nanoGPT groups with nothing added."""
    model, reference = _gpt("sp", n_layer=3), _gpt("sp", n_layer=3, seed=1)
    torch.manual_seed(2)
    model.apply(model._init_weights)
    for name, p in model.named_parameters():  # what GPT.__init__ runs, through the table
        if (std := P.reinit_std(model.config, name)) is not None:
            torch.nn.init.normal_(p, mean=0.0, std=std)
    torch.manual_seed(2)
    reference.apply(reference._init_weights)
    for name, p in reference.named_parameters():  # nanoGPT's model.py, verbatim in effect
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * 3))
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert model.input_scale == model.output_scale == 1.0
    assert all(b.attn.scale is None and b.branch_scale == 1.0 for b in model.transformer.h)

    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw").validate(), "cpu")
    assert [sorted(set(g) - set(torch.optim.AdamW([torch.zeros(1)]).defaults)) for g in
            optimizer.param_groups] == [["params"], ["params"]]  # fmt: skip
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_sp_optimizer_groups_ignore_the_mup_keys():
    """Under sp the mup_* keys change nothing: the same weights after the same steps."""
    finals = []
    for base in (256, 64):
        model = _gpt("sp")
        cfg = TrainConfig(optimizer="adamw", mup_base_width=base, warmup_steps=1).validate()
        optimizer = build_optimizer(model, cfg, "cpu")
        for step in range(3):
            set_lr(optimizer, lr_at(step, cfg))
            model(*_batch())[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        finals.append(model.state_dict())
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_init_and_forward_multipliers_by_hand(parametrization):
    width, layers = 128, 4  # m = 4, d = 4
    model = _gpt(
        parametrization,
        n_embd=width,
        n_layer=layers,
        mup_input_alpha=2.0,
        mup_output_alpha=3.0,
        mup_attn_alpha=0.5,
    )
    m = width / BASE_WIDTH
    h = model.transformer.h
    assert h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02 / math.sqrt(m), rel=0.05)
    assert h[1].attn.c_attn.weight.std().item() == pytest.approx(0.02 / math.sqrt(m), rel=0.05)
    proj = 0.02 / math.sqrt(2 * layers * m) if parametrization == "mup" else 0.02 / math.sqrt(m)
    assert h[0].mlp.c_proj.weight.std().item() == pytest.approx(proj, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.input_scale == 2.0
    assert model.output_scale == 3.0 / m
    assert h[0].attn.scale == 0.5 / (width // 2)  # alpha_attn / d_head
    assert h[0].branch_scale == (1.0 if parametrization == "mup" else 1.0 / layers)
    # The forward really applies them: logits x output_scale is the head of x.
    x, _ = _batch()
    seen = {}
    model.lm_head.register_forward_hook(lambda mod, i, o: seen.setdefault("in", i[0]))
    logits, _ = model(x, x)
    torch.testing.assert_close(logits, model.lm_head(seen["in"]))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_model_config_validates_its_keys():
    for bad, match in [
        ({"parametrization": "nope"}, "parametrization"),
        ({"mup_base_width": 0}, "mup_base_width"),
        ({"mup_attn_alpha": -1.0}, "mup_attn_alpha"),
    ]:
        with pytest.raises(UserError, match=match):
            GPT(GPTConfig(block_size=8, vocab_size=8, n_layer=1, n_head=1, n_embd=8, **bad))


# --------------------------------------------------------------------------- optimizer groups


def _expected(optimizer: str, parametrization: str, m: float, d: float) -> dict[str, tuple]:
    """By hand, from the papers: {layer: (lr multiple, weight decay)} of cfg's 1e-2 and 0.1."""
    wd = 0.1
    if optimizer in ADAM_TYPE:  # Table 3 Adam: hidden lr 1/m; microsoft/mup: wd x m
        return {"embedding": (1.0, wd), "hidden": (1 / m, wd * m), "biases, norms": (1.0, 0.0)}
    if optimizer in ("sgd", "momentum"):  # Table 3 SGD: vector-like x m, hidden 1
        return {"embedding": (m, wd / m), "hidden": (1.0, wd), "biases, norms": (m, 0.0)}
    assert optimizer == "muon"  # spectral condition: hidden 1; AdamW side x 0.1 as under sp
    return {"hidden": (1.0, wd), "embedding": (0.1, wd), "biases, norms": (0.1, 0.0)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("parametrization", ["mup", "completep"])
def test_each_optimizers_lr_scaling_by_hand_on_two_widths(optimizer, parametrization):
    if (parametrization, optimizer) in PARAMETRIZATION_UNSETTLED:
        with pytest.raises(UserError, match=f"optimizer={optimizer}"):
            _cfg(optimizer, parametrization)
        with pytest.raises(UserError, match=f"optimizer={optimizer}"):
            build_optimizer(_gpt(parametrization), _cfg(optimizer, "sp"), "cpu")
        return
    rates = {}
    for width in (64, 128):  # m = 2 and 4; d = 2 (n_layer 2, base depth 1)
        m, d = width / BASE_WIDTH, 2.0
        model = _gpt(parametrization, n_embd=width)
        cfg = _cfg(optimizer, parametrization)
        optimizer_ = build_optimizer(model, cfg, "cpu")
        expected = _expected(optimizer, parametrization, m, d)
        groups = {g["layer"]: g for g in optimizer_.param_groups}
        assert set(groups) == set(expected)
        assert _names(model, groups["hidden"]) == {
            n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2
        }
        assert _names(model, groups["embedding"]) == {
            "transformer.wte.weight",
            "transformer.wpe.weight",
        }
        for layer, (lr_multiple, wd) in expected.items():
            group = groups[layer]
            assert group["lr"] == pytest.approx(1e-2 * lr_multiple), layer  # after build
            assert group["weight_decay"] == pytest.approx(wd), layer
            if "eps" in group:  # completep: eps x 1 / (m d); mup: the optimizer's own
                default = {"adagrad": 1e-10}.get(optimizer, 1e-8)
                scale = 1 / (m * d) if parametrization == "completep" else 1.0
                assert group["eps"] == pytest.approx(default * scale), layer
        step = 1  # warmup: the schedule's rate, each group at its multiple
        set_lr(optimizer_, lr_at(step, cfg))
        for layer, (lr_multiple, _) in expected.items():
            assert groups[layer]["lr"] == pytest.approx(lr_at(step, cfg) * lr_multiple), layer
        rates[width] = {layer: g["lr"] for layer, g in groups.items()}
    # The two widths by hand: Adam-type hidden rates halve, SGD's vector-like ones double.
    ratio = {layer: rates[128][layer] / rates[64][layer] for layer in rates[64]}
    if optimizer in ADAM_TYPE:
        assert ratio == pytest.approx({"embedding": 1.0, "hidden": 0.5, "biases, norms": 1.0})
    elif optimizer in ("sgd", "momentum"):
        assert ratio == pytest.approx({"embedding": 2.0, "hidden": 1.0, "biases, norms": 2.0})
    else:
        assert ratio == pytest.approx({"embedding": 1.0, "hidden": 1.0, "biases, norms": 1.0})


def test_a_wrapped_model_gets_its_parametrizations_groups():
    """DDP's (module) and torch.compile's (_orig_mod) wrappers hide the model's config."""
    model = _gpt("mup", n_embd=64)
    outer, inner = torch.nn.Module(), torch.nn.Module()
    inner._orig_mod = model
    outer.module = inner
    optimizer = build_optimizer(outer, _cfg("adamw"), "cpu")
    assert [g["layer"] for g in optimizer.param_groups] == ["embedding", "hidden", "biases, norms"]
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-2 / 2)


@pytest.mark.parametrize(
    "optimizer, parametrization",
    [("adamw", "mup"), ("sgd", "mup"), ("muon", "mup"), ("lion", "mup"),
     ("adamw_schedulefree", "mup"), ("adamw", "completep"), ("adagrad", "completep")],
)  # fmt: skip
def test_resume_from_a_checkpoint_is_exact_and_keeps_the_multipliers(optimizer, parametrization):
    cfg = _cfg(optimizer, parametrization, learning_rate=3e-3)
    x, y = _batch()

    def train(model, opt, start, stop):
        for step in range(start, stop):
            set_lr(opt, lr_at(step, cfg))
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    straight = _gpt(parametrization, n_embd=64)
    opt = build_optimizer(straight, cfg, "cpu")
    train(straight, opt, 0, 6)
    set_optimizer_mode(opt, training=False)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": opt.state_dict()}, buffer)
    set_optimizer_mode(opt, training=True)
    built = [{k: g[k] for k in ("lr_scale", "weight_decay", "eps") if k in g} for g in
             opt.param_groups]  # fmt: skip
    train(straight, opt, 6, cfg.max_steps)

    resumed = _gpt(parametrization, n_embd=64, seed=5)
    opt = build_optimizer(resumed, cfg, "cpu")
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    for group in state["optimizer"]["param_groups"]:  # what a checkpoint of other keys holds
        group.update(lr_scale=7.0, weight_decay=0.5, eps=1.0)
    resumed.load_state_dict(state["model"])
    load_state(opt, state["optimizer"])
    assert [{k: g[k] for k in built[0] if k in g} for g in opt.param_groups] == built
    set_optimizer_mode(opt, training=True)
    train(resumed, opt, 6, cfg.max_steps)
    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


# --------------------------------------------------------------------------- real runs


def _text(path: Path) -> Path:
    rng = random.Random(3)
    words = ("the", "river", "stone", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(300)))
    return path


def _argv(storage: Path, name: str, text: Path, **overrides) -> list[str]:
    values = {
        **TINY_IN_PROCESS,
        "compile": "false",
        "storage_path": storage,
        "name": name,
        "data_file": text,
        "parametrization": "mup",
        "mup_base_width": 16,
        "learning_rate": 3e-3,
        **overrides,
    }
    return [part for key, value in values.items() for part in (flag_name(key), str(value))]


def test_a_mup_run_resumed_equals_the_uninterrupted_one_and_loads_as_mup(tmp_path, data_dir):
    """The real loop in this process (no Ray cluster): 12 steps straight, and 6 steps then
    a resume to 12, give the same losses; the checkpoint rebuilds the mup model (sample,
    eval, export load it so), a resume or --init-from under another parametrization is
    refused in one line."""
    text, storage = _text(tmp_path / "a.txt"), tmp_path / "results"
    assert train_cli.main(_argv(storage, "straight", text)) == 0
    assert train_cli.main(_argv(storage, "split", text, max_steps=6)) == 0
    assert train_cli.main(_argv(storage, "split", text, resume="true")) == 0
    straight = {r["step"]: r["train_loss"] for r in step_rows(storage / "straight")}
    split = {r["step"]: r["train_loss"] for r in step_rows(storage / "split")}
    assert sorted(straight) == sorted(split) == list(range(1, 13))
    for step in straight:
        assert split[step] == pytest.approx(straight[step], abs=1e-6), step

    t = loading.from_checkpoint(str(storage / "straight"))
    assert t.model.config.parametrization == "mup" and t.model.config.mup_base_width == 16
    state = checkpoint.load(checkpoint.latest_in_run(str(storage / "straight")))
    x = torch.tensor([t.tokenizer.encode("the river ")])
    saved = GPT(GPTConfig(**state["model_config"])).eval()
    saved.load_state_dict(state["model"])
    with torch.no_grad():
        torch.testing.assert_close(t.model(x, x)[0], saved(x, x)[0])

    with pytest.raises(UserError, match="parametrization=mup but this run has parametrization=sp"):
        checkpoint.check_config(state["config"], {**state["config"], "parametrization": "sp"})
    flags = {"init_from": str(storage / "straight"), "data_file": str(text), "block_size": 16}
    cfg = load_train_config(None, {**flags, "storage_path": str(storage)})
    with pytest.raises(
        UserError, match=r"init_from .* parametrization=mup .* --parametrization mup"
    ):
        init_from.model_to_train(cfg, t.tokenizer.vocab_size)
    mup = dataclasses.replace(cfg, parametrization="mup", mup_base_width=16)
    assert init_from.model_to_train(mup, t.tokenizer.vocab_size).config.parametrization == "mup"


def test_a_checkpoint_without_the_keys_is_sp():
    """An older raygpt's checkpoint has no parametrization keys: it loads and resumes as
    sp, and a resume asking for mup is refused rather than passed as unchanged."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in PARAMETRIZATION_KEYS}
    checkpoint.check_config(old, TrainConfig().to_dict())
    with pytest.raises(UserError, match="parametrization=sp but this run has parametrization=mup"):
        checkpoint.check_config(old, TrainConfig(parametrization="mup").to_dict())
    model = _gpt("sp")
    config = loading.model_config_from_state(model.state_dict(), {"n_head": 2}, "old")
    assert config.parametrization == "sp" and config.mup_base_width == 256
    with pytest.raises(UserError, match="Hugging Face"):
        loading.check_same_parametrization(TrainConfig(parametrization="mup"), GPTConfig(), "gpt2")


# --------------------------------------------------------------------------- config and docs


@pytest.mark.parametrize(
    "flags, fragment",
    [
        ({"parametrization": "mu-p"}, "unknown parametrization 'mu-p'"),
        ({"parametrization": "completep", "optimizer": "muon"}, "optimizer=muon"),
        ({"parametrization": "completep", "optimizer": "momentum"}, "optimizer=momentum"),
        ({"mup_base_width": 0}, "mup_base_width=0"),
        ({"mup_output_alpha": -1}, "mup_output_alpha=-1"),
    ],
)
def test_bad_parametrization_values_are_one_line(flags, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        load_train_config(None, flags)
    assert "\n" not in str(err.value)


def test_a_sweep_may_search_the_parametrization_and_its_alphas():
    dims = parse_search_space(["parametrization=sp,mup", "mup_output_alpha=0.5:4:log"])
    assert [d.key for d in dims] == ["parametrization", "mup_output_alpha"]
    with pytest.raises(UserError, match="'mup-p' is not one of sp, mup, completep"):
        parse_search_space(["parametrization=sp,mup-p"])


def test_every_optimizer_has_a_note_and_every_refusal_a_row():
    assert set(P.OPTIMIZER_NOTES) == set(OPTIMIZERS)
    for par, optimizer in PARAMETRIZATION_UNSETTLED:
        assert any(
            r.parametrization == par and r.family == P.FAMILIES[optimizer] and r.status == "refused"
            for r in P.RULES
        )
    assert all(r.source for r in P.RULES)


def test_the_docs_hold_the_codes_table():
    docs = (REPO / "docs" / "parametrization.md").read_text()
    assert P.markdown_table() in docs, "regenerate the table: parametrization.markdown_table()"
