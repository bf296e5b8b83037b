"""The parts of the CUDA path that CPU can check without Ray: the device index, the
sweep's GPU memory check, step timing, the compiler's cache across trials, Muon's
precision, the object-store sampler's reads and the logits a step keeps.

The compiled bf16 DDP path with a restart is in tests/cluster/test_cuda_path.py; what
needs a GPU itself is in tests/gpu/test_cuda.py.
"""

from __future__ import annotations

import json
import logging
import time
import weakref

import numpy as np
import pytest
import torch
from builders import LEGACY_BATCHES_SHA256, batches_sha256
from conftest import TINY_IN_PROCESS, step_rows, tiny_config

from raygpt import bench, storage
from raygpt.cluster import memory_estimate, resources
from raygpt.config.train import TrainConfig
from raygpt.data import manifest, sampler
from raygpt.errors import UserError
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime, newton_schulz_dtype, resolve_device
from raygpt.sweep.space import parse_search_space
from raygpt.train import driver as train_driver
from raygpt.train.muon import Muon, zeropower_via_newtonschulz5
from raygpt.train.optim import build_optimizer
from raygpt.train.step import train_step
from raygpt.train.step_stats import StepStats

CPU = torch.device("cpu")


GIB = 2**30


def test_a_cuda_device_is_always_indexed_or_refused_in_one_line():
    # torch.cuda.set_device and DDP refuse torch.device("cuda") (no index) with a ValueError;
    # every Runtime, however built, and every --device go through resolve_device.
    assert resolve_device("cpu") == CPU
    makers = {
        "create": lambda: Runtime.create(torch.device("cuda")).device,
        "constructor": lambda: Runtime(torch.device("cuda"), torch.float32, False).device,
        "name": lambda: resolve_device("cuda"),
    }
    for make in makers.values():
        if torch.cuda.is_available():
            assert make() == torch.device("cuda", torch.cuda.current_device())
        else:
            with pytest.raises(UserError, match="asks for CUDA but no GPU is available"):
                make()
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def _gpt2_small(**overrides) -> TrainConfig:
    values = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8)
    return TrainConfig(**(values | overrides)).validate()


def test_sweep_memory_check_takes_the_search_spaces_worst_point():
    base = _gpt2_small()
    # The base (batch 8) fits a 20 GiB share; a searched batch_size=32 trial needs ~34 GiB.
    resources.check_gpu_memory(base, 50257, 0.25, 80 * GIB)
    dims = parse_search_space(["batch_size=8,32", "weight_decay=0:0.2"], base)
    need, worst, point = memory_estimate.worst_case(base, 50257, dims, ["adamw"])
    assert point == {"batch_size": 32, "optimizer": "adamw"} and worst.batch_size == 32
    assert 33 * GIB < need < 36 * GIB
    with pytest.raises(UserError) as err:
        resources.check_gpu_memory(base, 50257, 0.25, 80 * GIB, dims, ["adamw"])
    text = str(err.value)
    assert "\n" not in text and "largest trial (batch_size=32) needs about" in text
    assert "batch_size=32 x block_size=1024" in text and "20.0 GiB" in text
    assert f"{need / GIB:.1f} GiB" in text
    resources.check_gpu_memory(base, 50257, 0.5, 80 * GIB, dims, ["adamw"])  # 40 GiB: fits


@pytest.mark.parametrize(
    "specs, optimizers, expected",
    [
        (["n_layer=6:24"], ["sgd"], {"n_layer": 24, "optimizer": "sgd"}),
        (["n_embd=384,1152"], ["sgd"], {"n_embd": 1152, "optimizer": "sgd"}),
        (["block_size=256:2048"], ["sgd"], {"block_size": 2048, "optimizer": "sgd"}),
        (["dtype=auto,float32"], ["sgd"], {"dtype": "float32", "optimizer": "sgd"}),
        ([], ["sgd", "lion", "adamw"], {"optimizer": "adamw"}),  # the most state
    ],
)
def test_each_memory_key_at_its_worst_raises_the_estimate(specs, optimizers, expected):
    base = _gpt2_small(optimizer="sgd")
    dims = parse_search_space(specs, base)
    need, worst, point = memory_estimate.worst_case(base, 50257, dims, optimizers)
    assert point == expected
    estimate = memory_estimate.estimate_training_bytes
    assert need == estimate(worst, 50257) > estimate(base, 50257)


def test_micro_batch_tokens_are_bounded_where_the_search_moves_them():
    # tokens_per_step fixes the step: the micro-batch never exceeds the step's tokens per
    # worker, however large batch_size is searched.
    base = _gpt2_small(tokens_per_step=16 * 1024)
    dims = parse_search_space(["batch_size=8,64"], base)
    need, _, _ = memory_estimate.worst_case(base, 50257, dims, ["adamw"])
    assert need == memory_estimate.estimate_training_bytes(base, 50257, tokens=16 * 1024)


def test_step_times_run_end_to_end_and_flag_the_first_step():
    stats = StepStats(CPU, world_size=1)
    stats.start_attempt()
    began = time.perf_counter()
    one = torch.tensor(1.0)
    for step in (1, 2, 3):
        time.sleep(0.03)  # host work between updates (batches, Python): part of the step
        stats.end_step(step, one, one)
    ended = time.perf_counter()
    time.sleep(0.2)  # an evaluation: no step's time
    stats.start_step()
    time.sleep(0.03)
    stats.end_step(4, one, one)
    readings = stats.read()
    assert [r.first for r in readings] == [True, False, False, False]
    assert all(0.03 <= r.seconds < 0.15 for r in readings), readings
    # The steps tile the interval: nothing between them goes unaccounted for.
    assert sum(r.seconds for r in readings[:3]) == pytest.approx(ended - began, abs=2e-3)


def test_first_step_of_a_run_has_no_throughput(tmp_path, data_dir, capsys):
    # The first step's time holds the warm-up (compiled, the compile too): no tok/s of its own.
    cfg = tiny_config(tmp_path, name="timing", **(TINY_IN_PROCESS | {"log_interval": 1}))
    summary = train_driver.run(cfg)
    rows = step_rows(tmp_path / "timing")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["tokens_per_sec"] is None and rows[0]["step_time_ms"] > 0
    assert all(r["tokens_per_sec"] > 0 for r in rows[1:])
    out = capsys.readouterr().out
    assert "step 1/12" in out and "first step" in out and "(compile, warm-up)" in out
    assert summary["step"] == 12


def test_bench_never_times_the_first_step(tmp_path, data_dir, capsys):
    out = tmp_path / "bench.json"
    argv = ["--synthetic", "--n-layer", "1", "--n-embd", "32", "--n-head", "2"]
    argv += ["--block-size", "16", "--batch-size", "2", "--warmup-steps", "0"]
    assert bench.main([*argv, "--bench-steps", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["variants"]
    assert len(row["step_ms"]) == 2 and row["first_step_ms"] > 0
    assert bench.main([*argv, "--bench-steps", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        "error: --bench-steps 1 with --warmup-steps 0 times nothing: the first step (compile, "
        "warm-up) is never timed; use --bench-steps 2 or more"
    ]


def _compiled_graphs(n_layer: int) -> int:
    """Graphs dynamo captures for one trial's model: a training and an eval forward. The
    "eager" backend stands in for inductor: the per-function cache is dynamo's, either way."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    model = torch.compile(
        GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=n_layer, n_head=2, n_embd=16)),
        backend="eager",
    )
    x = torch.randint(16, (2, 8))
    model(x, x)[1].backward()
    model.eval()
    with torch.no_grad():
        model(x, x)
    return counters["stats"]["unique_graphs"] - before


def test_every_compiling_runtime_starts_with_a_fresh_compiler_cache():
    torch._dynamo.reset()
    # Without a reset, a config past dynamo's recompile limit in one process (a reused
    # sweep trial process) gets no graph and runs eager: at the default limit of 8 that is
    # the fifth config; at 4, which the test sets to compile half as much, the third.
    with torch._dynamo.config.patch(recompile_limit=4):
        assert [_compiled_graphs(n) for n in range(1, 4)] == [2, 2, 0]
        graphs = []
        for n_layer in range(1, 4):
            runtime = Runtime.create(CPU, compile="true")  # what each attempt of the loop does
            assert runtime.compile
            graphs.append(_compiled_graphs(n_layer))
        assert graphs == [2] * 3
    torch._dynamo.reset()


def test_newton_schulz_runs_in_float32_off_native_bf16():
    for dtype in ("auto", "bfloat16", "float32"):
        assert newton_schulz_dtype(CPU, dtype) == torch.float32
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", dtype="bfloat16"), "cpu")
    assert isinstance(optimizer, Muon) and optimizer.run_dtype == "bfloat16"
    hidden = optimizer.param_groups[0]
    assert hidden["use_muon"] and optimizer.ns_dtype(hidden, CPU) == torch.float32
    # The step's update is the fp32 orthogonalisation (weight decay off to compare it).
    p = hidden["params"][0]
    hidden["weight_decay"] = 0.0
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    optimizer.step()
    expected = zeropower_via_newtonschulz5(p.grad.lerp(p.grad * 0.05, 0.95), dtype=torch.float32)
    scale = hidden["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5
    torch.testing.assert_close(before - p.detach(), scale * expected, rtol=1e-4, atol=1e-6)


def test_float16_is_not_safe_for_newton_schulz():
    # Why newton_schulz_dtype never picks fp16: small update entries flush in the cast.
    torch.manual_seed(0)
    g = torch.randn(256, 1024)
    for scale, fp16_off in ((1e-7, 0.1), (1e-8, 0.5)):
        ref = zeropower_via_newtonschulz5(g * scale, dtype=torch.float32)
        errors = {
            dtype: float(
                (zeropower_via_newtonschulz5(g * scale, dtype=dtype).float() - ref).norm()
                / ref.norm()
            )
            for dtype in (torch.bfloat16, torch.float16)
        }
        assert errors[torch.bfloat16] < 0.03 and errors[torch.float16] > fp16_off, errors


class _Requests(logging.Handler):
    """The requests moto's server (in this process) answers, from its access log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def shard_gets(self) -> int:
        return sum(1 for line in self.lines if "GET /" in line and ".bin " in line)


@pytest.fixture
def requests():
    log = logging.getLogger("werkzeug")
    handler, level = _Requests(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def test_object_store_sampler_reads_each_step_in_few_requests_and_the_same_tokens(
    resharded,
    s3_storage,
    requests,
):
    remote = storage.resolve(s3_storage, check=False)
    remote.upload_dir(str(resharded), remote.root)
    assert batches_sha256(s3_storage) == LEGACY_BATCHES_SHA256  # what the local files give
    near = sampler.BatchSampler(resharded, "train", 16, seed=5)
    far = sampler.BatchSampler(s3_storage, "train", 16, seed=5)
    sizes = [s["tokens"] for s in manifest.load_meta(resharded)["shards"]["train"]]
    bounds = np.cumsum([0, *sizes])
    mb, ws, ga = 3, 2, 2

    def shards_touched(step: int, rank: int) -> int:
        starts = [near.sample_indices(step, rank, m, mb, ws, ga) for m in range(ga)]
        return len(
            {
                i
                for s in np.concatenate(starts).tolist()
                for i in range(len(sizes))
                if s < bounds[i + 1] and s + 17 > bounds[i]
            }
        )

    far.get_step(0, 0, mb, ws, ga)  # opens the shards: their HEAD requests are not counted
    requests.lines.clear()
    expected, pools = 0, set()
    for step in range(12):
        for rank in range(ws):
            got = far.get_step(step, rank, mb, ws, ga)
            pools.add(far.tokens._pool)
            want = [near.get_batch(step, rank, m, mb, ws, ga) for m in range(ga)]
            for (x, y), (wx, wy) in zip(got, want, strict=True):
                assert torch.equal(x, wx) and torch.equal(y, wy)
            expected += shards_touched(step, rank)
    # One ranged read per shard a step touches (this small split's windows all coalesce),
    # not one per window: 6 windows a step and rank, some across shard boundaries.
    assert requests.shard_gets() == expected < 12 * ws * mb * ga
    # One pool, kept by the sampler across steps, and gone with it.
    (pool,) = pools - {None}
    threads = list(pool._threads)
    assert 0 < len(threads) <= 16 and all(t.name.startswith("raygpt-read") for t in threads)
    far.close()
    near.close()
    assert far.tokens._pool is None and not any(t.is_alive() for t in threads)
    assert np.array_equal(far.tokens.read(100, 50), near.tokens.read(100, 50))  # reopens
    far.close()


class _WatchLogits(torch.nn.Module):
    """The model, recording at each forward whether the previous forward's logits live."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.previous: weakref.ref | None = None
        self.alive_at_forward: list[bool] = []

    def forward(self, x, y):
        self.alive_at_forward.append(self.previous is not None and self.previous() is not None)
        logits, loss = self.model(x, y)
        self.previous = weakref.ref(logits)
        return logits, loss


def test_a_training_step_keeps_no_logits_into_the_next_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    watch = _WatchLogits(model)
    runtime = Runtime.create(CPU)
    batches = [(torch.randint(64, (4, 8)), torch.randint(64, (4, 8))) for _ in range(3)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = train_step(
        watch, list(model.parameters()), optimizer, runtime.grad_scaler(), batches,
        runtime.autocast, grad_clip=1.0,
    )  # fmt: skip
    assert watch.alive_at_forward == [False, False, False]
    assert watch.previous() is None and torch.isfinite(loss)
