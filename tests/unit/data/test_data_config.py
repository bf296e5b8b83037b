"""The data side of a run config: the micro-batch rule, the 124M preset, --dataset-dir."""

from __future__ import annotations

import pytest
from conftest import REPO

from raygpt.config.train import TrainConfig, load_train_config
from raygpt.data import prepare
from raygpt.errors import UserError


def test_micro_batch_is_the_largest_that_divides_the_step():
    cfg = TrainConfig(batch_size=12, block_size=64, tokens_per_step=64 * 24)
    # 24 sequences a step: per worker 24, 12, 8, 6, 4, 3, 2, 1 -> the largest b <= 12.
    got = {w: (cfg.micro_batch_size(w), cfg.grad_accum_steps(w)) for w in (1, 2, 3, 4, 6, 8)}
    assert got == {1: (12, 2), 2: (12, 1), 3: (8, 1), 4: (6, 1), 6: (4, 1), 8: (3, 1)}
    assert (
        TrainConfig(batch_size=12, block_size=64, tokens_per_step=64 * 16).micro_batch_size() == 8
    )
    with pytest.raises(UserError, match="tokens_per_step=1536 is not a multiple of block_size"):
        cfg.micro_batch_size(5)
    # Without tokens_per_step, batch_size is the micro-batch, as always.
    plain = TrainConfig(batch_size=12, num_workers=3).validate()
    assert (plain.batch_size, plain.grad_accum_steps()) == (12, 1)


def test_gpt2_124m_preset_runs_on_1_to_64_workers():
    preset = REPO / "experiments" / "gpt2_124m.toml"
    for workers in (1, 2, 4, 8, 16, 32, 64):
        cfg = load_train_config(str(preset), {"num_workers": workers})
        assert cfg.dataset == "fineweb_edu" and cfg.tokens_per_step == 524_288 == 2**19
        micro, accum = cfg.batch_size, cfg.grad_accum_steps()
        assert micro * cfg.block_size * workers * accum == 524_288
        assert micro <= 16 and micro == cfg.micro_batch_size(workers)
        assert cfg.validate().batch_size == micro  # validating again changes nothing
    assert load_train_config(str(preset), {"num_workers": 64}).batch_size == 8


def test_preset_dataset_must_be_prepared_first(tmp_path):
    cfg = load_train_config(
        str(REPO / "experiments" / "gpt2_124m.toml"), {"data_dir": str(tmp_path)}
    )
    with pytest.raises(UserError, match=r"raygpt\.data prepare --dataset fineweb_edu") as err:
        prepare.prepare_from_config(cfg)  # never downloads: it says how to prepare it
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_dataset_dir_flag(tmp_path, monkeypatch):
    (tmp_path / "shards").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(None, {"dataset_dir": "shards"})
    assert cfg.dataset_dir == str(tmp_path / "shards")  # workers run elsewhere
    with pytest.raises(UserError, match="dataset dir nope is not a folder"):
        load_train_config(None, {"dataset_dir": "nope"})
    (tmp_path / "t.txt").write_text("hello " * 100)
    with pytest.raises(UserError, match="not both"):
        load_train_config(None, {"dataset_dir": "shards", "data_file": "t.txt"})
    uri = "s3://bucket/fineweb?endpoint_override=127.0.0.1:9000&scheme=http"
    cfg = load_train_config(None, {"dataset_dir": uri})
    assert cfg.dataset_dir == uri and cfg.default_name().startswith("fineweb-")
