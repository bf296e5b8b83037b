"""What the benchmark smoke tests share: a generated text file, a tiny experiment, the
environment a script runs in (joining the session's cluster where it needs one), and
running a script as its documented command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BENCH = REPO / "benchmarks"

# A char-level recipe of experiments/shakespeare_char_cpu.toml's shape, in miniature.
TINY_EXPERIMENT = """\
dataset = "shakespeare_char"
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
batch_size = 4
dropout = 0.0
bias = false
optimizer = "adamw"
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.1
warmup_steps = 2
max_steps = 20
lr_decay_steps = 20
eval_interval = 5
eval_iters = 2
log_interval = 5
compile = "false"
"""


@pytest.fixture(scope="module", name="text_file")
def text_file_fixture(tmp_path_factory) -> Path:
    """~40 KB of verse-shaped text from a small vocabulary (deterministic)."""
    rng = random.Random(0)
    words = [
        "the", "king", "queen", "lord", "fair", "sweet", "night", "day", "love", "death",
        "blood", "crown", "sword", "heart", "thou", "thee", "art", "shall", "will", "not",
    ]  # fmt: skip
    lines: list[str] = []
    while sum(len(line) + 1 for line in lines) < 40_000:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        lines.append(line.capitalize() + rng.choice(".,;!?"))
        if rng.random() < 0.2:
            lines.append("")
    path = tmp_path_factory.mktemp("bench-text") / "verse.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", name="experiment")
def experiment_fixture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-experiment") / "tiny_char.toml"
    path.write_text(TINY_EXPERIMENT)
    return path


@pytest.fixture(name="env")
def env_fixture(data_dir) -> dict[str, str]:
    """This environment without a Ray address: a command needing no cluster starts none."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return base | {"RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(name="address")
def address_fixture(ray_cluster) -> str:
    """The session cluster's GCS address, for commands that join it."""
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(name="cluster_env")
def cluster_env_fixture(env, address) -> dict[str, str]:
    return env | {"RAY_ADDRESS": address}


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run `python ARGS...` in the repository; its stdout (it must exit 0)."""
    out = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def last_json(stdout: str) -> dict:
    """The JSON object a script prints last (indented, starting at a line's first column)."""
    return json.loads(stdout[stdout.rindex("\n{") + 1 :])
