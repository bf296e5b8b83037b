"""The CUDA path, on any CUDA machine: `pytest tests/gpu` (skipped where there is none).

bf16 autocast + torch.compile training, an exact resume and an automatic
restart on CUDA (checkpoints saved from the GPU, loaded on the CPU, RNG states
left on the CPU), the fp16 + GradScaler path, MFU within (0, 1), the bench, the
indexed device of every caller (eval's GPU scorers included), the sweep's memory
check and per-trial memory cap, Muon's bf16 Newton-Schulz, step times from CUDA
events, and a step's peak memory (no logits held into the next forward).
CI has no GPU; a session lent one runs these first. The CPU-checkable halves of the
same fixes are in tests/test_cuda_path.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, step_rows, tiny_config

from raygpt.errors import UserError
from raygpt.runtime import Runtime, newton_schulz_dtype, resolve_device
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.train import driver as train_driver
from raygpt.train import metrics
from raygpt.train.faults import FAIL_AT_ENV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHORT = dict(max_steps=12, lr_decay_steps=12, eval_interval=6, warmup_steps=2, use_gpu="true")


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in step_rows(run_dir)}


@pytest.fixture(scope="module")
def whole(ray_cluster, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cuda")
    summary = train_driver.run(tiny_config(storage, name="whole", compile="true", **SHORT))
    return storage, summary


def test_bf16_compiled_run_trains_and_reports_mfu(whole):
    storage, summary = whole
    assert summary["step"] == 12
    rows = step_rows(storage / "whole")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # The first step holds the compile: no throughput, no MFU; every other step has both.
    assert rows[0]["tokens_per_sec"] is None and rows[0]["mfu"] is None
    assert all(r["tokens_per_sec"] > 0 for r in rows[1:])
    name = torch.cuda.get_device_name(0)
    if metrics.peak_flops(name) is None:
        pytest.skip(f"{name} is not in metrics.PEAK_TFLOPS: no MFU to check")
    mfus = [r["mfu"] for r in rows[1:]]
    assert all(m is not None and 0 < m < 1 for m in mfus), mfus


def test_resume_on_cuda_equals_uninterrupted(whole):
    storage, _ = whole
    train_driver.run(
        tiny_config(storage, name="split", compile="true", **{**SHORT, "max_steps": 6})
    )
    train_driver.run(tiny_config(storage, name="split", compile="true", resume=True, **SHORT))
    a, b = _losses(storage / "whole"), _losses(storage / "split")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


def test_worker_death_restarts_on_cuda(whole, monkeypatch, capfd):
    storage, _ = whole
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "0:9")
    summary = train_driver.run(
        tiny_config(storage, name="crash", compile="true", max_failures=1, **SHORT)
    )
    assert summary["step"] == 12
    a, b = _losses(storage / "whole"), _losses(storage / "crash")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert "resumed from step 6" in capfd.readouterr().out


def test_in_process_on_cuda_equals_worker_group_and_records_the_gpu(whole):
    storage, _ = whole
    train_driver.run(
        tiny_config(storage, name="inproc", compile="true", in_process="true", **SHORT)
    )
    a, b = _losses(storage / "whole"), _losses(storage / "inproc")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    for name in ("whole", "inproc"):  # the ranks' GPU, not the driver's view
        info = json.loads((storage / name / "run.json").read_text())
        assert info["workers"][0]["device_name"] == torch.cuda.get_device_name(0)


def test_step_stats_read_cuda_events_in_one_wait_and_time_host_work():
    import time

    from raygpt.train.step_stats import StepStats

    stats = StepStats(resolve_device("cuda"), world_size=1)
    a = torch.randn(2048, 2048, device="cuda")
    stats.start_attempt()
    for step in range(1, 4):
        time.sleep(0.05)  # host work between updates, the device idle: part of the step
        loss = (a @ a).mean()
        stats.end_step(step, loss, loss.abs())
    readings = stats.read()
    assert [r.step for r in readings] == [1, 2, 3] and len(stats) == 0
    assert [r.first for r in readings] == [True, False, False]
    assert all(r.seconds >= 0.045 and r.grad_norm == abs(r.train_loss) for r in readings)


def test_every_caller_gets_an_indexed_cuda_device():
    current = torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda") == resolve_device("auto") == current
    assert Runtime.create(torch.device("cuda")).device == current  # set_device took it
    assert Runtime(torch.device("cuda"), torch.bfloat16, False).device == current
    with pytest.raises(UserError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_eval_scorers_run_on_the_gpu(ray_cluster):
    from raygpt.eval import scoring, workers
    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    spans = [(list(range(i, i + 20)), 5) for i in range(6)]
    on_gpu = workers.score(
        model, [spans[:3], spans[3:]], workers=1, cpus_per_worker=1, use_gpu=True
    )
    on_cpu = scoring.sum_logprobs(model, spans)
    got = [s for chunk in on_gpu for s in chunk]
    assert [n for _, n in got] == [n for _, n in on_cpu]
    for (a, _), (b, _) in zip(got, on_cpu, strict=True):
        assert a == pytest.approx(b, rel=1e-2)  # TF32 matmuls on the GPU


def test_per_trial_memory_cap_fails_the_trial_that_outgrows_it():
    # In a child process: the cap is process-wide and would limit this test process too.
    code = """
import torch
from raygpt.runtime import limit_gpu_memory
device = limit_gpu_memory(0.25)
total = torch.cuda.get_device_properties(device).total_memory
small = torch.empty(int(0.15 * total), dtype=torch.uint8, device=device)
try:
    torch.empty(int(0.15 * total), dtype=torch.uint8, device=device)
except torch.OutOfMemoryError:
    print("capped")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "capped", out.stderr[-2000:]


def test_sweep_memory_check_refuses_the_search_spaces_largest_trial(ray_cluster, tmp_path):
    # 12 x 768 at block 256: batch 8 needs ~6 GiB, a searched batch 512 ~50 GiB, more
    # than a quarter of any GPU up to 192 GiB.
    args = [
        "--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--block-size", "256",
        "--batch-size", "8", "--max-steps", "10", "--eval-interval", "10",
        "--optimizers", "adamw", "--search", "grid", "--grid-points", "1", "--scheduler", "fifo",
        "--search-space", "batch_size=8,512", "--gpus-per-trial", "0.25",
        "--name", "packed", "--storage-path", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"largest trial.*batch_size=512") as err:
        sweep_driver.run(*sweep_cli.configs_from_argv(args))
    assert "--gpus-per-trial 0.25" in str(err.value)
    assert not (tmp_path / "packed").exists()  # refused before anything was written


def test_muon_orthogonalises_in_bf16_on_a_native_bf16_gpu():
    from raygpt.config.train import TrainConfig
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.train.optim import build_optimizer

    device = resolve_device("cuda")
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        assert newton_schulz_dtype(device) == torch.float32  # emulated bf16: fp32
        return
    assert newton_schulz_dtype(device, "auto") == newton_schulz_dtype(device, "bfloat16")
    assert newton_schulz_dtype(device, "auto") == torch.bfloat16
    assert newton_schulz_dtype(device, "float32") == torch.float32
    assert newton_schulz_dtype(device, "float16") == torch.float32  # never fp16
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = build_optimizer(model.to(device), TrainConfig(optimizer="muon"), "cuda")
    hidden = optimizer.param_groups[0]
    assert hidden["use_muon"] and optimizer.ns_dtype(hidden, device) == torch.bfloat16


def test_a_step_holds_no_logits_through_its_backward():
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.train.step import train_step

    device = resolve_device("cuda")
    runtime = Runtime(device, torch.float32, False)
    B, T, V = 8, 256, 50304  # the logits (fp32, 412 MB) dwarf this one-layer model
    logits_bytes = B * T * V * 4

    class KeepLogits(torch.nn.Module):
        """The model, with a reference to its logits held until the step is over."""

        def __init__(self, model):
            super().__init__()
            self.model, self.kept = model, []

        def forward(self, x, y):
            logits, loss = self.model(x, y)
            self.kept.append(logits)
            return logits, loss

    def peak_of_a_step(keep: bool) -> int:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=1, n_head=2, n_embd=64))
        model.to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = (torch.randint(V, (B, T), device=device) for _ in range(2))
        forward = KeepLogits(model) if keep else model
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(
            forward, list(model.parameters()), optimizer, runtime.grad_scaler(), [(x, y)],
            runtime.autocast, grad_clip=1.0,
        )  # fmt: skip
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before

    # Were the step itself to keep the logits, a second reference would cost nothing.
    ours, held = peak_of_a_step(keep=False), peak_of_a_step(keep=True)
    assert held - ours > 0.75 * logits_bytes, (ours, held, logits_bytes)


def test_fp16_with_grad_scaler_trains(ray_cluster, tmp_path):
    summary = train_driver.run(tiny_config(tmp_path, name="fp16", dtype="float16", **SHORT))
    rows = step_rows(tmp_path / "fp16")
    assert summary["step"] == 12 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_bench_on_cuda_prints_tokens_per_second(tmp_path):
    # --device auto (the default): the path that set_device once refused unindexed.
    report = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.bench", "--n-layer", "2", "--n-embd", "128",
         "--n-head", "4", "--block-size", "128", "--batch-size", "8", "--bench-steps", "5",
         "--compare", "--json", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    name = torch.cuda.get_device_name(0)
    assert "tokens/s" in out.stdout and f"bench on {name}" in out.stdout
    result = json.loads(report.read_text())
    assert result["device"] == name
    variants = result["variants"]
    assert all(not v.get("skipped") and v["tokens_per_sec"] > 0 for v in variants), variants
    assert [v["compile"] for v in variants] == [False, False, True], variants
    assert all(len(v["step_ms"]) == 5 for v in variants)
