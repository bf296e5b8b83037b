"""MFU arithmetic, the peak-FLOPS table, the row log and the step table (no Ray)."""

from __future__ import annotations

import pytest

from raygpt.model.gpt import GPT, GPTConfig
from raygpt.train import metrics


def test_mfu_matches_a_hand_computation():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    # PaLM appendix B: 6N + 12 L H Q T flops per token, N without position embeddings.
    n = sum(p.numel() for p in model.parameters()) - 16 * 32
    per_token = 6 * n + 12 * 2 * 2 * 16 * 16
    assert model.flops_per_token() == per_token
    # 8 A100s (312 TFLOPS bf16 each) processing 1e6 tokens/s
    peak = metrics.peak_flops("NVIDIA A100-SXM4-80GB")
    assert peak == 312e12
    expected = per_token * 1e6 / (312e12 * 8)
    assert metrics.mfu(per_token, 1e6, 8, peak) == pytest.approx(expected)


@pytest.mark.parametrize(
    "device, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
    ],
)
def test_peak_table_picks_the_specific_entry(device, tflops):
    assert metrics.peak_flops(device) == tflops * 1e12


def test_cpu_and_unknown_devices_have_no_mfu_unless_told():
    assert metrics.peak_flops(None) is None
    assert metrics.peak_flops("Some Future GPU") is None
    assert metrics.mfu(1e6, 1e4, 1, None) is None
    assert metrics.peak_flops(None, peak_tflops=2.0) == 2e12
    line = metrics.progress_line(
        {"step": 5, "train_loss": 2.0, "lr": 1e-3, "tokens_per_sec": 100.0, "mfu": None}, 10, 3
    )
    assert "mfu n/a" in line and "step 5/10" in line


def test_peak_table_knows_new_devices_and_scales_mig_slices():
    assert metrics.peak_flops("NVIDIA H200 NVL") == 835e12
    assert metrics.peak_flops("NVIDIA H200") == 989e12
    assert metrics.peak_flops("NVIDIA H800 PCIe") == 756e12
    assert metrics.peak_flops("NVIDIA GB200") == 2500e12
    assert metrics.peak_flops("NVIDIA H20") == 148e12
    assert metrics.peak_flops("NVIDIA A100-SXM4-40GB MIG 3g.20gb") == pytest.approx(312e12 * 3 / 7)
