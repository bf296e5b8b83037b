"""The CUDA path, on any CUDA machine: `pytest tests/gpu` (skipped where there is none).

bf16 autocast + torch.compile training, an exact resume and an automatic
restart on CUDA (checkpoints saved from the GPU, loaded on the CPU, RNG states
left on the CPU), the fp16 + GradScaler path, MFU within (0, 1), and the bench.
CI has no GPU; a session lent one runs these first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, step_rows, tiny_config

from raygpt import train
from raygpt.loop import FAIL_AT_ENV

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
    summary = train.run(tiny_config(storage, name="whole", compile="true", **SHORT))
    return storage, summary


def test_bf16_compiled_run_trains_and_reports_mfu(whole):
    storage, summary = whole
    assert summary["step"] == 12
    rows = step_rows(storage / "whole")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    known = [r["mfu"] for r in rows if r["mfu"] is not None]
    if known:  # a GPU in the peak table (or --peak-tflops)
        assert all(0 < m < 1 for m in known), known


def test_resume_on_cuda_equals_uninterrupted(whole):
    storage, _ = whole
    train.run(tiny_config(storage, name="split", compile="true", **{**SHORT, "max_steps": 6}))
    train.run(tiny_config(storage, name="split", compile="true", resume=True, **SHORT))
    a, b = _losses(storage / "whole"), _losses(storage / "split")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


def test_worker_death_restarts_on_cuda(whole, monkeypatch, capfd):
    storage, _ = whole
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "0:9")
    summary = train.run(tiny_config(storage, name="crash", compile="true", max_failures=1, **SHORT))
    assert summary["step"] == 12
    a, b = _losses(storage / "whole"), _losses(storage / "crash")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    assert "resumed from step 6" in capfd.readouterr().out


def test_in_process_on_cuda_equals_worker_group_and_records_the_gpu(whole):
    storage, _ = whole
    train.run(tiny_config(storage, name="inproc", compile="true", in_process="true", **SHORT))
    a, b = _losses(storage / "whole"), _losses(storage / "inproc")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    for name in ("whole", "inproc"):  # the ranks' GPU, not the driver's view
        info = json.loads((storage / name / "run.json").read_text())
        assert info["workers"][0]["device_name"] == torch.cuda.get_device_name(0)


def test_step_stats_read_cuda_events_in_one_wait():
    from raygpt.step_stats import StepStats

    stats = StepStats(torch.device("cuda"), world_size=1)
    a = torch.randn(2048, 2048, device="cuda")
    for step in range(1, 4):
        stats.start_step()
        loss = (a @ a).mean()
        stats.end_step(step, loss, loss.abs())
    readings = stats.read()
    assert [r.step for r in readings] == [1, 2, 3] and len(stats) == 0
    assert all(r.seconds > 0 and r.grad_norm == abs(r.train_loss) for r in readings)


def test_fp16_with_grad_scaler_trains(ray_cluster, tmp_path):
    summary = train.run(tiny_config(tmp_path, name="fp16", dtype="float16", **SHORT))
    rows = step_rows(tmp_path / "fp16")
    assert summary["step"] == 12 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_bench_on_cuda_prints_tokens_per_second(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.bench", "--n-layer", "2", "--n-embd", "128",
         "--n-head", "4", "--block-size", "128", "--batch-size", "8", "--bench-steps", "5",
         "--compare"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stdout and "cuda" in (out.stdout + out.stderr).lower()
