"""Every bad input a user can type: the cases, and the runner that checks them.

Each case runs the real CLI (`python -m raygpt.train` / `raygpt.sweep` /
`raygpt.cluster`) in a subprocess with a time limit, then checks that stderr is
exactly one line starting with `error:` that names the bad value or key, that
no traceback was printed, and that no run folder was created or touched: the
storage folder is snapshotted (paths, sizes, mtimes) before and after.

Every subprocess pays ~3 s of imports (torch, Ray), so the cases run a few at a
time in a thread pool, started when the first case needs it; each
parametrized case then waits for and checks its own. Four cases resume (or
collide with) one tiny real run (~20-40 s of Ray), trained once per module;
two start a local Ray cluster to be refused by the capacity check. Those six
run from tests/cluster/test_bad_input.py, the rest from tests/unit/cli/.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from raygpt import checkpoint
from raygpt.data import manifest, prepare

CASE_TIMEOUT_S = 150  # one CLI call; Ray start-up on a busy 2-core box takes ~20 s
TRAIN_TIMEOUT_S = 300  # the one real training run
POOL_SIZE = 3
RUN_NAME = "tiny"
# The tiny real run; its resumes must repeat the model flags to get as far as the checks.
TINY_MODEL = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "1",
    "--warmup-steps", "1", "--compile", "false",
]  # fmt: skip
WORDS = (
    "the a river stone quick brown fox jumps over lazy dog model token learns from "
    "every sentence while rates decay slowly and gradients flow through layers"
)
HAS_GPU = shutil.which("nvidia-smi") is not None
TOO_MANY_WORKERS = 64 if (os.cpu_count() or 1) < 64 else 4 * (os.cpu_count() or 1)


# --------------------------------------------------------------------------- inputs


def _write_text(path: Path, size: int, words: list[str], seed: int) -> Path:
    """Sentences of random words: a few hundred KB prepare and train in no time."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
        lines.append(line)
        total += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class World:
    """Files shared by every case: texts, prepared data cache, TOML/YAML inputs."""

    root: Path
    env: dict[str, str]
    text: Path  # the main corpus (lowercase words)
    other_text: Path  # another vocabulary (upper case and digits)
    tiny_text: Path  # ~200 characters
    vocab: int
    other_vocab: int
    typo_toml: Path
    bad_toml: Path
    bad_yaml: Path
    small_model: Path  # a GPT-2 config.json with a 16-token context (no weights needed)
    run_storage: Path  # holds the tiny real run, trained on demand

    def storage(self, case: str) -> Path:
        """A per-case storage path; nothing may appear there."""
        return self.root / "storage" / case


@pytest.fixture(scope="module", name="world")
def world_fixture(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    data_dir = root / "data"
    words = WORDS.split()
    text = _write_text(root / "corpus.txt", 300_000, words, seed=1)
    other_text = _write_text(
        root / "other.txt", 20_000, [w.upper() for w in words] + list("0123456789"), seed=2
    )
    tiny_text = root / "tiny.txt"
    tiny_text.write_text(("hello world. " * 20)[:200], encoding="utf-8")
    vocab = {}
    for path in (text, other_text, tiny_text):  # prepared once, before any CLI runs
        vocab[path] = manifest.load_meta(prepare.prepare(None, data_file=path, data_dir=data_dir))[
            "vocab_size"
        ]
    assert vocab[text] != vocab[other_text]

    typo_toml = root / "typo.toml"
    typo_toml.write_text("lerning_rate = 1e-3\n")
    bad_toml = root / "bad.toml"
    bad_toml.write_text("max_steps = = 3\n")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text(
        "cluster_name: bad\nmax_workers: lots\n"
        "provider:\n  type: local\n  head_ip: 127.0.0.1\n  worker_ips: []\n"
    )
    small_model = root / "small_gpt2"
    small_model.mkdir()
    (small_model / "config.json").write_text(
        json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 16, "vocab_size": 100})
    )

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join a cluster that happens to run here
    env.update(RAYGPT_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return World(
        root=root,
        env=env,
        text=text,
        other_text=other_text,
        tiny_text=tiny_text,
        vocab=vocab[text],
        other_vocab=vocab[other_text],
        typo_toml=typo_toml,
        bad_toml=bad_toml,
        bad_yaml=bad_yaml,
        small_model=small_model,
        run_storage=root / "runs",
    )


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]


def run_cli(world: World, module: str, args: list[str], timeout: float) -> tuple[int, str, str]:
    """`python -m module args` in its own process group; a hang fails (and is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=world.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray processes it started
        out, err = proc.communicate()
        pytest.fail(f"{module} {' '.join(args)} hung for {timeout}s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder`: size and mtime (empty if it does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_dir()
    }


def train_tiny_run(world: World) -> Path:
    """The one real Ray run that the resume cases start from."""
    code, out, err = run_cli(
        world,
        "raygpt.train",
        [*train_args(world, world.run_storage), "--name", RUN_NAME],
        TRAIN_TIMEOUT_S,
    )
    run_dir = world.run_storage / RUN_NAME
    # --address local and one worker: in this process, whatever cluster runs on the machine.
    assert "running in this process (Ray Train local mode)" in out, out[-2000:]
    if code != 0 or checkpoint.latest_in_run(run_dir) is None:
        raise RuntimeError(
            f"the tiny training run failed (exit {code}):\n{out[-2000:]}\n{err[-3000:]}"
        )
    return run_dir


def train_args(world: World, storage: Path, *extra: str, data_file: Path | None = None):
    return [
        *TINY_MODEL,
        "--data-file", str(data_file or world.text),
        "--storage-path", str(storage),
        "--address", "local",
        *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- cases


FRESH, SHARED_RUN = "fresh", "shared-run"


@dataclass(frozen=True)
class Case:
    module: str
    # (world, storage) -> argv; storage is the folder whose files must survive
    args: Callable[[World, Path], list[str]]
    # (world, storage) -> fragments the error line must contain
    fragments: Callable[[World, Path], list[str]]
    # Where --storage-path points. FRESH: a per-case folder that must never appear.
    # SHARED_RUN: the tiny real run's storage, used in place (read-only, shared).
    # A function(storage, trained run folder or None): fills a per-case folder first.
    storage: str | Callable[[Path, Path | None], None] = FRESH
    uses_run: bool = False  # needs the tiny real run (waits for it)
    starts_ray: bool = False
    marks: tuple = field(default_factory=tuple)


def _copy_run_and_break_checkpoint(storage: Path, run_dir: Path | None) -> None:
    shutil.copytree(run_dir, storage / RUN_NAME)
    latest = Path(checkpoint.latest_in_run(storage / RUN_NAME))
    (latest / checkpoint.STATE_FILE).write_bytes(b"\x00garbage, not a torch zip file" * 10)


def _taken_sweep_name(storage: Path, run_dir: Path | None) -> None:
    (storage / "taken").mkdir(parents=True)
    (storage / "taken" / "trials.parquet").write_bytes(b"a dummy sweep result")


def _latest_state(storage: Path) -> str:
    return str(Path(checkpoint.latest_in_run(storage / RUN_NAME)) / checkpoint.STATE_FILE)


def _train(*extra: str, data_file: str | None = None) -> Callable[[World, Path], list[str]]:
    def args(world: World, storage: Path) -> list[str]:
        file = getattr(world, data_file) if data_file else None
        return train_args(world, storage, *extra, data_file=file)

    return args


def _fixed(*fragments: str) -> Callable[[World, Path], list[str]]:
    return lambda world, storage: list(fragments)


CASES: dict[str, Case] = {
    # 1. unknown optimizer
    "optimizer-unknown": Case(
        "raygpt.train", _train("--optimizer", "lamb"), _fixed("'lamb'", "adamw")
    ),
    # 2. learning rate <= 0, not a number, nan
    "lr-zero": Case(
        "raygpt.train", _train("--learning-rate", "0"), _fixed("learning_rate=0.0", "> 0")
    ),
    "lr-negative": Case(
        "raygpt.train", _train("--learning-rate", "-1e-3"), _fixed("learning_rate=-0.001", "> 0")
    ),
    "lr-not-a-number": Case(
        "raygpt.train", _train("--learning-rate", "fast"), _fixed("'fast'", "--learning-rate")
    ),
    "lr-nan": Case(
        "raygpt.train", _train("--learning-rate", "nan"), _fixed("'nan'", "finite number")
    ),
    # 3. unknown key, as a flag and in a TOML file
    "key-typo-flag": Case(
        "raygpt.train",
        _train("--lerning-rate", "1e-3"),
        _fixed("--lerning-rate", "did you mean --learning-rate"),
    ),
    "key-typo-toml": Case(
        "raygpt.train",
        lambda world, storage: [str(world.typo_toml), *train_args(world, storage)],
        lambda world, storage: ["'lerning_rate'", "'learning_rate'", str(world.typo_toml)],
    ),
    # 4. malformed TOML
    "toml-malformed": Case(
        "raygpt.train",
        lambda world, storage: [str(world.bad_toml), *train_args(world, storage)],
        lambda world, storage: [str(world.bad_toml), "not valid TOML"],
    ),
    # 5. missing data file
    "data-file-missing": Case(
        "raygpt.train",
        lambda world, storage: train_args(world, storage, data_file=Path("/nonexistent.txt")),
        _fixed("/nonexistent.txt"),
    ),
    # 7. resume with another model shape / another vocabulary
    "resume-other-shape": Case(
        "raygpt.train",
        _train("--name", RUN_NAME, "--resume", "--n-embd", "64"),
        _fixed("n_embd=32", "n_embd=64"),
        storage=SHARED_RUN,
        uses_run=True,
    ),
    "resume-other-vocab": Case(
        "raygpt.train",
        _train("--name", RUN_NAME, "--resume", data_file="other_text"),
        lambda world, storage: [
            "vocabulary",
            f"{world.vocab} tokens",
            f"has {world.other_vocab}",
        ],
        storage=SHARED_RUN,
        uses_run=True,
    ),
    # 8. corrupt checkpoint (in a copy of the run)
    "resume-corrupt-checkpoint": Case(
        "raygpt.train",
        _train("--name", RUN_NAME, "--resume"),
        lambda world, storage: [_latest_state(storage), "damaged"],
        storage=_copy_run_and_break_checkpoint,
        uses_run=True,
    ),
    # 9. block size beyond the data, GPT-2's context, a local model's context
    "block-size-over-data": Case(
        "raygpt.train",
        _train("--block-size", "512", data_file="tiny_text"),
        _fixed("block_size 512", "too large"),
    ),
    "block-size-over-gpt2": Case(
        "raygpt.train",
        _train("--init-from", "gpt2", "--block-size", "2048"),
        _fixed("block_size=2048", "gpt2", "1024"),
    ),
    "block-size-over-local-model": Case(
        "raygpt.train",
        lambda world, storage: train_args(world, storage, "--init-from", str(world.small_model)),
        lambda world, storage: ["block_size=32", str(world.small_model), "context of 16"],
    ),
    # 10. more than the cluster can host (a local Ray starts in the CLI)
    "too-many-workers": Case(
        "raygpt.train",
        _train("--num-workers", str(TOO_MANY_WORKERS)),
        _fixed(f"{TOO_MANY_WORKERS} workers", "--num-workers"),
        starts_ray=True,
    ),
    "gpu-without-gpus": Case(
        "raygpt.train",
        _train("--use-gpu", "true"),
        _fixed("GPU", "--use-gpu"),
        starts_ray=True,
        marks=(pytest.mark.skipif(HAS_GPU, reason="this machine has GPUs; the run would start"),),
    ),
    # 13. an existing run name without --resume
    "run-exists": Case(
        "raygpt.train",
        _train("--name", RUN_NAME),
        _fixed(f"'{RUN_NAME}' already exists", "--resume"),
        storage=SHARED_RUN,
        uses_run=True,
    ),
    # 15. checkpoint interval zero; an unknown upload mode
    "checkpoint-interval": Case(
        "raygpt.train",
        _train("--checkpoint-interval", "0"),
        _fixed("checkpoint_interval=0", "> 0"),
    ),
    "checkpoint-upload": Case(
        "raygpt.train",
        _train("--checkpoint-upload", "later"),
        _fixed("checkpoint_upload='later'", "async, sync"),
    ),
    # 16. a storage URI of a kind raygpt cannot write
    "storage-scheme": Case(
        "raygpt.train",
        lambda world, storage: [*train_args(world, storage), "--storage-path", "hdfs://nn/x"],
        _fixed("hdfs://nn/x", "s3://"),
    ),
    # 17. an unknown parametrization, one with no rule for the optimizer, and a coordinate
    # check at a width the heads do not divide
    "parametrization-unknown": Case(
        "raygpt.train",
        _train("--parametrization", "mupp"),
        _fixed("'mupp'", "did you mean 'mup'"),
    ),
    "parametrization-optimizer": Case(
        "raygpt.train",
        _train("--parametrization", "completep", "--optimizer", "sgd"),
        _fixed("parametrization=completep", "optimizer=sgd"),
    ),
    "coord-check-width-heads": Case(
        "raygpt.mup",
        lambda world, storage: ["coord-check", "--widths", "64,90", "--out", str(storage)],
        _fixed("--widths 90", "n_embd=90", "n_head=4"),
    ),
    # 11. sweep: resume a sweep that does not exist
    "sweep-resume-missing": Case(
        "raygpt.sweep",
        lambda world, storage: train_args(world, storage, "--name", "nosuch", "--resume"),
        _fixed("'nosuch'", "cannot resume"),
    ),
    # 12. sweep: LO >= HI, unknown optimizer
    "sweep-lr-range-reversed": Case(
        "raygpt.sweep",
        lambda world, storage: train_args(world, storage, "--lr-range", "adamw=1e-2:1e-4"),
        _fixed("adamw=1e-2:1e-4", "LO < HI"),
    ),
    "sweep-optimizer-unknown": Case(
        "raygpt.sweep",
        lambda world, storage: train_args(world, storage, "--optimizers", "adamw,lamb"),
        _fixed("'lamb'", "--optimizers"),
    ),
    # 13. sweep: an existing name without --resume
    "sweep-exists": Case(
        "raygpt.sweep",
        lambda world, storage: train_args(world, storage, "--name", "taken"),
        _fixed("'taken' already exists", "--resume"),
        storage=_taken_sweep_name,
    ),
    # 14. invalid cluster YAML
    "cluster-yaml-invalid": Case(
        "raygpt.cluster",
        lambda world, storage: ["validate", str(world.bad_yaml)],
        lambda world, storage: [str(world.bad_yaml), "max_workers", "'lots'"],
    ),
}


def case_storage(world: World, name: str) -> Path:
    return world.run_storage if CASES[name].storage == SHARED_RUN else world.storage(name)


class Runner:
    """Runs the selected cases a few at a time; each test waits for its own outcome."""

    def __init__(self, world: World, selected: list[str]):
        self.world = world
        self.pool = ThreadPoolExecutor(max_workers=POOL_SIZE)
        self.trained: Future[Path] | None = None
        if any(CASES[name].uses_run for name in selected):
            self.trained = self.pool.submit(train_tiny_run, world)  # the longest job first
        # Ray start-ups next, quick ones after, those waiting on the real run last.
        order = sorted(selected, key=lambda n: (CASES[n].uses_run, not CASES[n].starts_ray))
        self.outcomes = {name: self.pool.submit(self._run, name) for name in order}

    def _run(self, name: str) -> Outcome:
        case = CASES[name]
        run_dir = self.trained.result() if case.uses_run else None
        storage = case_storage(self.world, name)
        if callable(case.storage):
            storage.mkdir(parents=True)
            case.storage(storage, run_dir)
        before = snapshot(storage)
        code, out, err = run_cli(
            self.world, case.module, case.args(self.world, storage), CASE_TIMEOUT_S
        )
        return Outcome(code, out, err, before, snapshot(storage))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module", name="runner")
def runner_fixture(request, world):
    # Only this module's cases that were collected (-k) and are not skipped.
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input"
        and item.path == request.path
        and not any(m.name == "skipif" and m.args[0] for m in item.iter_markers())
    ]
    r = Runner(world, selected)
    yield r
    r.close()


def params(on_ray: bool) -> list:
    """One param per case of the kind asked for: those that start Ray or wait on the real
    run (on_ray), or the rest."""
    return [
        pytest.param(name, id=name, marks=case.marks)
        for name, case in CASES.items()
        if (case.starts_ray or case.uses_run) == on_ray
    ]


def check_case(name: str, runner: Runner, world: World) -> None:
    case = CASES[name]
    storage = case_storage(world, name)
    outcome = runner.outcomes[name].result()
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    shown = f"stdout:\n{outcome.stdout[-2000:]}\nstderr:\n{outcome.stderr[-4000:]}"

    assert outcome.returncode == 2, shown
    assert "Traceback" not in outcome.stderr + outcome.stdout, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for fragment in case.fragments(world, storage):
        assert fragment in lines[0], f"{fragment!r} missing from: {lines[0]}"
    # Nothing written before was lost or touched, and no run folder appeared.
    changed = {
        path: (outcome.before.get(path), outcome.after.get(path))
        for path in outcome.before.keys() | outcome.after.keys()
        if outcome.before.get(path) != outcome.after.get(path)
    }
    assert not changed, f"files changed in {storage} (size, mtime before/after): {changed}"
    if case.storage == FRESH:
        assert not storage.exists(), f"{storage} was created: {sorted(storage.rglob('*'))}"
