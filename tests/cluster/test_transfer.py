"""One real small transfer on the embedded corpus: proxy sweeps at three widths on the
session's cluster, their best learning rates, the trend and the target's prediction.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from raygpt.sweep import driver as sweep_driver
from raygpt.sweep import transfer

PNG = b"\x89PNG\r\n\x1a\n"


TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "20", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "20", "--compile", "false",
]  # fmt: skip


def test_a_real_small_transfer_sweep(ray_cluster, storage, capsys):
    args = [
        *TINY,
        "--optimizers", "adamw", "--search", "grid", "--grid-points", "3",
        "--lr-range", "adamw=4e-3:6.4e-2", "--max-concurrent-trials", "2",
        "--transfer", "n_embd=16,32,48", "--target", "n_embd=96",
        "--name", "tiny-transfer", "--storage-path", str(storage),
    ]  # fmt: skip
    sweep, train = sweep_driver.configs_from_argv(args)
    outcome = transfer.run(sweep, train, sweep_driver.run, sweep_driver.check_found_something)
    folder = storage / "tiny-transfer"
    for w in (16, 32, 48):
        rows = pq.read_table(folder / "proxies" / f"n_embd={w}" / "trials.parquet").to_pylist()
        assert len(rows) == 3 and {r["n_embd"] for r in rows} == {w}
        assert all(r["flops"] > 0 and r["device_seconds"] > 0 for r in rows)
    assert (folder / "transfer.png").read_bytes()[:8] == PNG
    table = pq.read_table(folder / "transfer.parquet").to_pylist()
    assert [r["n_embd"] for r in table if r["kind"] == "proxy"] == [16, 32, 48]
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("adamw: ")]
    assert "for n_embd=96" in line, out[-3000:]
    assert line.startswith("adamw: lr ") or line.startswith("adamw: no prediction"), line
    assert outcome["written"] == [str(folder / "transfer.parquet"), str(folder / "transfer.png")]
