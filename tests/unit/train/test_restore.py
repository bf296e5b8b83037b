"""raygpt.train.restore: a rank's starting state (the newest sound checkpoint on storage,
found inside Ray Train's local mode, which starts no Ray), and resume_from's checks and
exact load of model and optimizer state."""

from __future__ import annotations

import warnings

import pytest
import ray
import torch
from conftest import one_line

from raygpt import checkpoint, storage
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.model import init_from
from raygpt.train import restore
from raygpt.train.optim import build_optimizer

ITOS = list("\n abcdefghijk")
META = {"dataset": "unit", "tokenizer": "char", "vocab_size": len(ITOS), "itos": ITOS}


def _cfg(tmp_path, **overrides) -> TrainConfig:
    values = dict(
        storage_path=str(tmp_path),
        n_layer=1,
        n_head=2,
        n_embd=16,
        block_size=8,
        batch_size=2,
        dtype="float32",
        compile="false",
    )
    return TrainConfig(**(values | overrides)).validate()


def _parts(cfg: TrainConfig, seed: int):
    torch.manual_seed(seed)
    model = init_from.build_model(cfg, len(ITOS))
    optimizer = build_optimizer(model, cfg, "cpu")
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


def _trained_state(cfg: TrainConfig, step: int = 6) -> tuple[dict, torch.nn.Module, object]:
    model, optimizer, scaler = _parts(cfg, seed=0)
    x = torch.randint(0, len(ITOS), (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the optimizer then has moments to restore
        model(x, torch.roll(x, -1, 1))[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    state = checkpoint.training_state(
        model,
        optimizer,
        scaler,
        step=step,
        first_loss=4.25,
        best_val_loss=3.5,
        last_val_loss=3.75,
        config=cfg.to_dict(),
        data_meta=META,
        dtype="float32",
    )
    return state, model, optimizer


def test_resume_from_loads_model_and_optimizer_exactly(tmp_path):
    cfg = _cfg(tmp_path)
    state, model, optimizer = _trained_state(cfg)
    fresh, fresh_opt, scaler = _parts(cfg, seed=99)
    progress = restore.resume_from(state, "ckpt", fresh, fresh_opt, scaler, cfg, META, "float32")
    assert progress == (6, 4.25, 3.5, 3.75)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        assert torch.equal(saved[key]["exp_avg"], loaded[key]["exp_avg"])
        assert torch.equal(saved[key]["exp_avg_sq"], loaded[key]["exp_avg_sq"])
    # An older checkpoint without last_val_loss still resumes.
    del state["last_val_loss"]
    again = _parts(cfg, seed=5)
    assert restore.resume_from(state, "ckpt", *again, cfg, META, "float32")[3] is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"cfg": {"n_embd": 32}}, "the checkpoint has n_embd=16 but this run has n_embd=32"),
        ({"dtype": "bfloat16"}, "dtype=float32 but this run computes in dtype=bfloat16"),
        ({"meta": {"itos": list("\n abcdefghijz")}}, "trained on data with itos="),
        ({"cfg": {"optimizer": "sgd"}}, "has optimizer=adamw but this run has optimizer=sgd"),
    ],
)
def test_an_incompatible_run_is_refused_before_loading(tmp_path, change, says):
    cfg = _cfg(tmp_path)
    state, _, _ = _trained_state(cfg)
    other = _cfg(tmp_path, **change.get("cfg", {}))
    fresh, fresh_opt, scaler = _parts(other, seed=3)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    meta = META | change.get("meta", {})
    with pytest.raises(UserError) as err:
        restore.resume_from(
            state, "ckpt", fresh, fresh_opt, scaler, other, meta, change.get("dtype", "float32")
        )
    assert says in one_line(err)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_nan_weights_are_refused_naming_the_checkpoint(tmp_path):
    cfg = _cfg(tmp_path)
    state, _, _ = _trained_state(cfg)
    name = next(iter(state["model"]))
    state["model"] = {**state["model"], name: torch.full_like(state["model"][name], float("nan"))}
    with pytest.raises(UserError) as err:
        restore.resume_from(
            state, "runs/r/checkpoint_0000006", *_parts(cfg, 1), cfg, META, "float32"
        )
    text = one_line(err)
    assert text.startswith("cannot resume: checkpoint runs/r/checkpoint_0000006 has NaN")
    assert name in text


def _in_local_mode(fn):
    """Run `fn` as a Ray Train function in this process (local mode: no Ray session)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        lambda: fn(), scaling_config=ScalingConfig(num_workers=0), run_config=RunConfig(name="u")
    ).fit()
    assert not ray.is_initialized()
    return result.return_value


def test_newest_state_skips_a_damaged_checkpoint(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    store = storage.resolve(str(tmp_path), check=False)
    run_path = store.path("run")
    state = _trained_state(cfg)[0]
    for step in (3, 12, 6):  # written out of order: the step in the name decides
        checkpoint.save(
            f"{run_path}/{checkpoint.checkpoint_dir_name(step)}", state | {"step": step}
        )
    got = _in_local_mode(lambda: restore.newest_state(store, run_path))
    assert got[0]["step"] == 12 and got[1] == f"{run_path}/checkpoint_0000012"
    # A crash mid-upload left the newest one cut short: the one before it wins.
    newest = tmp_path / "run" / "checkpoint_0000012" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    state, path = _in_local_mode(lambda: restore.newest_state(store, run_path))
    assert (state["step"], path) == (6, f"{run_path}/checkpoint_0000006")
    assert isinstance(next(iter(state["model"].values())), torch.Tensor)
    assert (
        f"[raygpt] skipping checkpoint {run_path}/checkpoint_0000012: " in capsys.readouterr().out
    )


def test_newest_state_skips_a_checkpoint_of_arbitrary_bytes(tmp_path):
    cfg = _cfg(tmp_path)
    store = storage.resolve(str(tmp_path), check=False)
    run_path = store.path("run")
    state = _trained_state(cfg)[0]
    checkpoint.save(f"{run_path}/checkpoint_0000006", state | {"step": 6})
    checkpoint.save(f"{run_path}/checkpoint_0000012", state | {"step": 12})
    (tmp_path / "run" / "checkpoint_0000012" / "state.pt").write_bytes(b"half a file")
    state, _ = _in_local_mode(lambda: restore.newest_state(store, run_path))
    assert state["step"] == 6


def test_newest_state_of_a_run_without_checkpoints(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    assert _in_local_mode(lambda: restore.newest_state(store, store.path("none"))) == (None, None)


def test_no_tune_checkpoint_outside_a_trial():
    # Outside a Tune trial (a plain run), there is no checkpoint to hand over.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Ray says it is outside a session
        assert restore.tune_checkpoint_state() == (None, None)
