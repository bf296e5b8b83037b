"""Two writers of one sweep folder: a second sweep of the same name, started while the
first runs, is refused in seconds naming the holder, and the first finishes with every
trial once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO, TINY_SWEEP, one_error_line

from raygpt import results, run_folder
from raygpt.sweep import cli as sweep_cli


@pytest.mark.timeout(400)
def test_a_second_sweep_of_one_name_is_refused_and_the_first_finishes(
    ray_cluster, data_dir, storage, tmp_path, capsys
):
    args = [*TINY_SWEEP, "--name", "shared", "--storage-path", str(storage), "--overwrite"]
    # The first sweep joins the session's cluster, as a second user's sweep would.
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env["RAY_ADDRESS"] = address
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "raygpt.sweep", *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        lease = storage / run_folder.LOCKS_DIR / "shared.json"
        deadline = time.time() + 120
        while not lease.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lease.exists(), log.read_text()[-3000:]

        started = time.perf_counter()
        assert sweep_cli.main([*args, "--address", "local"]) == 2  # --overwrite too: refused
        took = time.perf_counter() - started
        err = one_error_line(capsys)
        assert f"host {socket.gethostname()}, pid {first.pid}, since " in err
        assert "sweep 'shared'" in err and took < 15, (took, err)
        print(f"the second sweep was refused in {took:.1f} s: {err.strip()}")

        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    trials = pq.read_table(storage / "shared" / results.TRIALS_FILE).to_pylist()
    assert len(trials) == 2 and len({t["trial_id"] for t in trials}) == 2
    assert {t["status"] for t in trials} == {"completed"} and {t["steps"] for t in trials} == {10}
    assert not lease.exists()
