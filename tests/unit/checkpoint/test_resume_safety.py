"""A resume continues what was trained, and a diverged model is never picked up.

Real checkpoints from real tiny runs in this process (no Ray cluster: seconds each).
A resume with other data, another optimizer, another dtype or any key outside
config.resume.RESUME_MAY_CHANGE is refused in one line naming the key, with nothing in the
run folder changed; a key that may change reaches the restored optimizer and is
recorded in run.json next to the original config. A diverged run leaves its last
sound checkpoint as the latest, and sample, export, --resume and --init-from refuse
NaN weights in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_IN_PROCESS, step_rows

from raygpt import checkpoint, export, sample
from raygpt.config.io import flag_name
from raygpt.config.resume import RESUME_MAY_CHANGE, RESUME_NOT_COMPARED
from raygpt.config.train import TrainConfig
from raygpt.data import manifest, prepare
from raygpt.errors import UserError
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import restore_grad_scaler
from raygpt.storage import resolve as storage_resolve
from raygpt.train import cli as train_cli
from raygpt.train import preflight
from raygpt.train.optim import build_optimizer, load_state

# 6 steps, a checkpoint at step 6; a resume runs on to TINY_IN_PROCESS's 12.
FIRST = {**TINY_IN_PROCESS, "max_steps": 6, "compile": "false"}
# Every character of the texts below, in both: the same vocabulary, other text.
ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n"
WORDS = ("the", "river", "stone", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "decay")


def _text(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(400)]
    path.write_text(ALPHABET + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _argv(storage: Path, name: str, text: Path, **overrides) -> list[str]:
    values = {**FIRST, "storage_path": storage, "name": name, "data_file": text, **overrides}
    return [part for key, value in values.items() for part in (flag_name(key), str(value))]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Two 6-step runs, read-only for the tests: "base" (float32, dtype auto on the
    CPU) and "bf16" (--dtype bfloat16, whose GradScaler saves an empty state)."""
    root = tmp_path_factory.mktemp("resume_safety")
    texts = {"a": _text(root / "a.txt", seed=1), "b": _text(root / "b.txt", seed=2)}
    storage = root / "results"
    assert train_cli.main(_argv(storage, "base", texts["a"])) == 0
    assert train_cli.main(_argv(storage, "bf16", texts["a"], dtype="bfloat16")) == 0
    return root, storage, texts


def _copy_run(runs, name: str, tmp_path: Path) -> Path:
    _, storage, _ = runs
    shutil.copytree(storage / name, tmp_path / name)
    return tmp_path / name


def _latest_state(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.latest_in_run(str(run_dir)))


# --------------------------------------------------------------------------- must match


@pytest.mark.parametrize(
    "run, overrides, fragments",
    [
        # Same characters (so the same vocabulary and itos), other text.
        ("base", {"data_file": "b"}, ["source_sha256=", "same data"]),
        ("base", {"optimizer": "sgd"}, ["optimizer=adamw", "optimizer=sgd", "--optimizer adamw"]),
        ("base", {"dtype": "bfloat16"}, ["dtype=float32", "dtype=bfloat16", "--dtype float32"]),
        # dtype auto resolves to float32 on this CPU, before Ray would start.
        ("bf16", {"dtype": "auto"}, ["dtype=bfloat16", "dtype=float32", "--dtype bfloat16"]),
        ("base", {"seed": 7}, ["seed=1337", "seed=7", "--seed 1337"]),
        (
            "base",
            {"parametrization": "mup"},
            ["parametrization=sp", "parametrization=mup", "--parametrization sp"],
        ),
        # 4 x 16 x 1 tokens per step before, 2 x 16 x 1 now.
        ("base", {"batch_size": 2}, ["tokens_per_step=64", "tokens_per_step=32"]),
    ],
    ids=[
        "other-text",
        "optimizer",
        "dtype",
        "dtype-auto",
        "seed",
        "parametrization",
        "tokens-per-step",
    ],
)
def test_a_resume_that_does_not_match_is_refused_and_changes_nothing(
    runs, capsys, run, overrides, fragments
):
    _, storage, texts = runs
    overrides = dict(overrides)
    text = texts[overrides.pop("data_file", "a")]
    before = _snapshot(storage / run)
    capsys.readouterr()
    code = train_cli.main(_argv(storage, run, text, resume="true", max_steps=12, **overrides))
    line = _one_error_line(capsys)
    assert code == 2
    assert line.startswith("error: cannot resume: ") and "another --name" in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert _snapshot(storage / run) == before


def test_other_text_with_the_same_characters_is_named_by_its_sha(runs, capsys):
    _, storage, texts = runs
    meta = {k: manifest.load_meta(prepare.prepare(None, data_file=texts[k])) for k in "ab"}
    assert meta["a"]["itos"] == meta["b"]["itos"]  # the vocabulary alone cannot tell
    assert meta["a"]["source_sha256"] != meta["b"]["source_sha256"]
    capsys.readouterr()
    assert train_cli.main(_argv(storage, "base", texts["b"], resume="true")) == 2
    line = _one_error_line(capsys)
    assert meta["a"]["source_sha256"][:16] in line and meta["b"]["source_sha256"][:16] in line


def test_the_loop_compares_the_dtype_the_device_resolved(runs):
    """Before Ray starts, dtype auto of a worker group is not known: the driver's check
    passes it, and the loop's (the same function, given the device's dtype) refuses."""
    _, storage, texts = runs
    state = _latest_state(storage / "bf16")
    assert state["dtype"] == "bfloat16"
    cfg = TrainConfig.from_dict({**state["config"], "dtype": "auto"})
    meta = manifest.load_meta(prepare.prepare(None, data_file=texts["a"]))
    checkpoint.check_compatible(state, cfg.to_dict(), meta, dtype=None)
    with pytest.raises(UserError, match="dtype=bfloat16 but this run computes in dtype=float32"):
        checkpoint.check_compatible(state, cfg.to_dict(), meta, dtype="float32")


def test_the_keys_that_may_change_are_config_keys():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_MAY_CHANGE) <= fields and set(RESUME_NOT_COMPARED) <= fields
    # What the saved state depends on never may.
    refused = fields - set(RESUME_MAY_CHANGE) - set(RESUME_NOT_COMPARED)
    assert {"optimizer", "dtype", "seed", "tokens_per_step", "n_layer", "dataset"} <= refused


# --------------------------------------------------------------------------- may change


def test_a_may_change_key_reaches_the_restored_optimizer_and_the_record(runs, tmp_path):
    _, _, texts = runs
    run_dir = _copy_run(runs, "base", tmp_path)
    argv = _argv(tmp_path, "base", texts["a"], resume="true", max_steps=12)
    assert train_cli.main([*argv, "--weight-decay", "0.3", "--beta2", "0.95"]) == 0
    assert [r["step"] for r in step_rows(run_dir)] == list(range(1, 13))
    state = _latest_state(run_dir)
    assert state["step"] == 12
    groups = state["optimizer"]["param_groups"]
    # load_state_dict alone would have brought back 0.1 and (0.9, 0.99).
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.3]
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["weight_decay"] == 0.1 and record["config"]["max_steps"] == 6
    (resume,) = record["resumes"]
    assert resume["from_step"] == 6
    assert resume["changes"] == {
        # The run was copied to another storage path: where it runs may change too.
        "storage_path": [str(runs[1]), str(tmp_path)],
        "weight_decay": [0.1, 0.3],
        "beta2": [0.99, 0.95],
        "max_steps": [6, 12],
    }
    now = preflight.current_config(record)
    assert (now["weight_decay"], now["beta2"], now["max_steps"]) == (0.3, 0.95, 12)


def test_a_sweep_record_keeps_its_start_and_adds_each_resume(tmp_path):
    store = storage_resolve(str(tmp_path))
    path = store.path("sweep.json")
    first = {"sweep": {"name": "s", "resume": False, "seeds": 1}, "config": {"max_steps": 6}}
    preflight.write_record(store, path, first)
    again = {"sweep": {"name": "s", "resume": True, "seeds": 2}, "config": {"max_steps": 12}}
    preflight.write_record(store, path, again, resumed=True)
    preflight.write_record(store, path, again, resumed=True)
    record = json.loads(Path(path).read_text())
    assert record["config"] == {"max_steps": 6} and record["sweep"]["seeds"] == 1
    changes = [r["changes"] for r in record["resumes"]]
    assert changes == [{"max_steps": [6, 12], "sweep.seeds": [1, 2]}, {}]
    assert preflight.current_config(record, "sweep")["seeds"] == 2


@pytest.mark.parametrize("optimizer", ["muon", "adamw_schedulefree"])
def test_load_state_keeps_the_configs_hyperparameters_and_the_optimizers_own(optimizer):
    """The saved moments and an optimizer's own group state (schedule-free's averaging
    weights) come back; what the config sets in a group is this run's."""
    config = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    old = TrainConfig(optimizer=optimizer, max_steps=10).validate()
    new = dataclasses.replace(
        old, weight_decay=0.3, beta1=0.8, muon_momentum=0.9, muon_adamw_lr_scale=0.5
    )
    trained_optimizer = build_optimizer(model, old, "cpu")
    x = torch.randint(0, 16, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    trained_optimizer.step()
    saved = trained_optimizer.state_dict()
    restored = build_optimizer(model, new, "cpu")
    load_state(restored, saved)
    for group, saved_group in zip(restored.param_groups, saved["param_groups"], strict=True):
        assert tuple(group["betas"]) == (0.8, 0.99)
        assert group["weight_decay"] in (0.0, 0.3)
        for key in set(saved_group) - {"params", "betas", "weight_decay", "momentum", "lr_scale"}:
            assert group[key] == saved_group[key], key  # e.g. schedule-free's k, weight_sum
    if optimizer == "muon":
        assert [g["lr_scale"] for g in restored.param_groups] == [1.0, 0.5, 0.5]
        assert restored.param_groups[0]["momentum"] == 0.9
    else:
        assert restored.param_groups[0]["k"] == 1  # one step taken, not a fresh average
    for p in model.parameters():
        for key, value in trained_optimizer.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(restored.state[p][key], value), key


# --------------------------------------------------------------------------- GradScaler


def test_an_empty_scaler_state_is_not_loaded_and_a_real_one_round_trips(runs):
    _, storage, _ = runs
    state = _latest_state(storage / "bf16")
    assert state["scaler"] == {}  # a disabled scaler (bfloat16) saves nothing
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):  # what the guard keeps away
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(state["scaler"])
    restore_grad_scaler(enabled, state["scaler"])
    assert enabled.get_scale() == 2.0**16  # its own initial scale
    # An fp16 run's state: a scale that has backed off, and its growth tracker.
    fp16 = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7, enabled=True)
    saved = fp16.state_dict()
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    restore_grad_scaler(fresh, saved)
    assert fresh.state_dict() == saved
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    restore_grad_scaler(disabled, saved)  # nothing to restore, nothing raised
    assert disabled.state_dict() == {}


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize(
    "blow_up",
    [
        # A rate 5000x the run's, loss and val loss read at every step: the update after
        # step 7's loss read shows in step 7's val loss, 60x the first loss.
        {"learning_rate": 5.0, "min_lr": 5.0, "eval_interval": 1, "log_interval": 1},
        # No evaluation, a checkpoint due at every step, and a weight decay that turns the
        # matrices infinite in one update: step 7's loss (read before it) is sound.
        {
            **{"learning_rate": 1.0, "min_lr": 1.0, "weight_decay": 1e39},  # decays x (1 - 1e39)
            **{"eval_interval": 40, "log_interval": 40, "checkpoint_interval": 1},
        },
    ],
    ids=["by-loss", "by-weights"],
)
def test_a_diverged_run_keeps_its_last_sound_checkpoint_as_the_latest(
    runs, tmp_path, capsys, blow_up
):
    """The sound 6-step run resumed with settings that blow it up (they may change on a
    resume), a checkpoint due at every step: the one at step 6 stays the latest."""
    _, _, texts = runs
    run_dir = _copy_run(runs, "base", tmp_path)
    settings = {"warmup_steps": 0, "grad_clip": 0.0, "divergence_factor": 1.2, **blow_up}
    argv = _argv(tmp_path, "base", texts["a"], resume="true", max_steps=40, lr_decay_steps=40)
    flags = [part for k, v in settings.items() for part in (flag_name(k), str(v))]
    assert train_cli.main([*argv, *flags]) == 1  # diverged
    assert "diverged at step" in capsys.readouterr().out
    last_step = max(r["step"] for r in step_rows(run_dir))
    assert 6 < last_step < 40
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_0000006"]
    state = _latest_state(run_dir)
    assert checkpoint.first_non_finite(state["model"]) is None
    capsys.readouterr()
    argv = ["--checkpoint", str(run_dir), "--max-new-tokens", "3", "--device", "cpu"]
    assert sample.main(argv) == 0
    assert capsys.readouterr().out.count(sample.SEPARATOR) == 3


def test_nan_weights_are_refused_by_sample_export_resume_and_init_from(runs, tmp_path, capsys):
    _, _, texts = runs
    run_dir = _copy_run(runs, "base", tmp_path)
    folder = checkpoint.latest_in_run(str(run_dir))
    state = checkpoint.load(folder)
    state["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = math.nan
    checkpoint.save(folder, state)
    before = _snapshot(run_dir)
    capsys.readouterr()

    assert sample.main(["--checkpoint", str(run_dir), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "NaN or infinite weights (transformer.h.0.mlp.c_fc.weight)" in line, line
    assert folder in line

    target = tmp_path / "exported"
    assert export.main(["--checkpoint", folder, "--hf", str(target)]) == 2
    assert "NaN or infinite weights" in _one_error_line(capsys)
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]

    resume = _argv(tmp_path, "base", texts["a"], resume="true", max_steps=12)
    assert train_cli.main(resume) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: cannot resume: checkpoint ") and "NaN" in line, line

    assert train_cli.main(_argv(tmp_path, "finetune", texts["a"], init_from=folder)) == 2
    assert "NaN or infinite weights" in _one_error_line(capsys)
    assert not (tmp_path / "finetune").exists()
    assert _snapshot(run_dir) == before
