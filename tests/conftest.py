"""Shared fixtures: one real local Ray cluster and one prepared corpus per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3server import s3_auth_endpoint, s3_endpoint, s3_storage  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A session cache of prepared datasets (pydocs_char is built once, ~5 s)."""
    path = tmp_path_factory.mktemp("data")
    os.environ["RAYGPT_DATA_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(data_dir):
    """A private local Ray cluster (never one already running on the machine)."""
    import ray

    from raygpt import launch

    launch.connect("local")
    yield ray
    ray.shutdown()


@pytest.fixture
def storage(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


# A 12-step run in this process (no Ray cluster): the cheapest real raygpt.train run.
TINY_IN_PROCESS = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=4,
    max_steps=12,
    lr_decay_steps=12,
    warmup_steps=2,
    eval_interval=6,
    eval_iters=2,
    log_interval=6,
    in_process="true",
)


def tiny_config(storage: Path, **overrides):
    """A model small enough that a Ray run takes seconds on 2 cores."""
    from raygpt.config import TrainConfig

    values = dict(
        storage_path=str(storage),
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=8,
        max_steps=20,
        warmup_steps=5,
        eval_interval=10,
        eval_iters=4,
        log_interval=10,
        learning_rate=3e-3,
        compile="false",
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def step_rows(folder: Path | str) -> list[dict]:
    """Every step row of a run or sweep folder (its Parquet parts), one per (trial, step)."""
    from raygpt import results, storage

    table, _ = results.read_steps(storage.resolve(str(folder), check=False), _root(folder))
    return table.to_pylist() if table is not None else []


def step_metadata(folder: Path | str) -> dict:
    from raygpt import results, storage

    return results.read_steps(storage.resolve(str(folder), check=False), _root(folder))[1]


def _root(folder: Path | str) -> str:
    from raygpt import storage

    return storage.resolve(str(folder), check=False).root
