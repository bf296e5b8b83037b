"""Two-node drill: a Ray cluster of a CPU-less head and two 1-CPU nodes on one machine.

Run once per session by tests/cluster/conftest.py in a subprocess (it needs its own Ray
cluster), for tests/cluster/test_object_storage.py and tests/cluster/test_reliability.py:
    python tests/cluster/drills/two_nodes.py STORAGE_URI LOCAL_DIR
With one CPU per node, a 2-worker run (SPREAD) has its ranks on different nodes (and equals
a one-rank run with the same global batch, in the driver's process), and a
sweep of two concurrent 1-worker trials has its trials on different nodes (all on
STORAGE_URI). Last, a run in LOCAL_DIR loses the node that hosts its worker mid-run and
must resume on the other node. Prints one JSON line with the nodes, the runs' summaries
and the node removed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import ray._private.state
from ray.cluster_utils import Cluster
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from raygpt.config.train import TrainConfig
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.train import driver as train_driver

# The line the drill prints once its cluster is up (and no longer recorded as the
# machine's current cluster); tests/cluster/conftest.py waits for it.
CLUSTER_UP = "[drill] cluster up at"

SHORT = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=32, max_steps=12, lr_decay_steps=12,
    eval_interval=6, eval_iters=4, log_interval=100, warmup_steps=2, learning_rate=3e-3,
    compile="false",
)  # fmt: skip
SWEEP = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--max-steps", "10", "--eval-interval", "5", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "100", "--compile", "false",
    "--optimizers", "adamw", "--search", "grid", "--grid-points", "2",
    "--scheduler", "fifo", "--max-concurrent-trials", "2",
]  # fmt: skip


def _registered_checkpoint(run_dir: Path) -> bool:
    try:
        snapshot = json.loads((run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def lose_a_node(cluster: Cluster, nodes: list, local_dir: str) -> dict:
    """Train in local_dir and remove the node that hosts the worker once a checkpoint is
    registered; the run's summary and the node removed."""
    cfg = TrainConfig(
        name="node-loss",
        storage_path=local_dir,
        n_layer=2,
        n_head=4,
        n_embd=128,
        block_size=64,
        batch_size=8,
        max_steps=200,
        eval_interval=10,
        eval_iters=2,
        log_interval=50,
        warmup_steps=5,
        max_failures=2,
        compile="false",
    ).validate()
    removed: dict[str, str] = {}

    def remove_training_node() -> None:
        try:
            run_dir = Path(local_dir) / "node-loss"
            deadline = time.time() + 240
            # A checkpoint folder exists before the controller has registered it; a node
            # lost in between restarts from step 0. The controller's snapshot names the
            # checkpoints it has registered.
            while not _registered_checkpoint(run_dir) and time.time() < deadline:
                time.sleep(0.1)
            # The worker holds its node's only CPU. (Not the State API: with another
            # Ray cluster on the machine it can query the wrong dashboard.)
            free = ray._private.state.available_resources_per_node()
            victim = next(n for n in nodes if free[n.node_id].get("CPU", 0) == 0)
            node_id = victim.node_id
            print(f"[drill] removing node {node_id[:12]} that hosts the worker", flush=True)
            cluster.remove_node(victim, allow_graceful=False)
            removed["node"] = node_id
        except Exception as err:  # the JSON line then says no node was removed
            print(f"[drill] could not remove the node: {err!r}", flush=True)

    killer = threading.Thread(target=remove_training_node, daemon=True)
    killer.start()
    summary = train_driver.run(cfg)
    killer.join(timeout=5)
    return {"removed_node": removed.get("node"), "summary": summary}


def _drop_record(head_address: str) -> None:
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if record.read_text().strip() == head_address:  # not another cluster's since
            record.unlink()


def main(storage: str, local_dir: str) -> None:
    # A node that dies is declared dead after 3 missed 1-s health checks rather than
    # Ray's default of 5 missed 3-s checks, so its run's restart waits seconds, not 15;
    # no dashboard, whose processes this drill never reads, while both nodes train.
    head = {
        "num_cpus": 0,
        "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    # Cluster() records its head as this machine's current cluster, which a `ray.init()`
    # or `raygpt.train` elsewhere on the machine would then join. This drill runs beside
    # other tests and joins by address, so the record goes at once.
    _drop_record(cluster.gcs_address)
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    print(f"{CLUSTER_UP} {cluster.gcs_address}", flush=True)
    try:
        spread = train_driver.run(
            TrainConfig(
                name="spread", storage_path=storage, num_workers=2, batch_size=8,
                placement_strategy="SPREAD", **SHORT,
            ).validate()
        )  # fmt: skip
        # The one-rank reference needs no worker group: it runs in this process (Ray
        # Train's local mode, the same loop), which saves a worker group's start.
        single = train_driver.run(
            TrainConfig(
                name="single", storage_path=storage, batch_size=16, in_process="true", **SHORT
            ).validate()
        )
        summary = sweep_driver.run(
            *sweep_cli.configs_from_argv([*SWEEP, "--name", "sweep", "--storage-path", storage])
        )
        print(
            json.dumps(
                {
                    "nodes": [n.node_id for n in nodes],
                    "spread": spread,
                    "single": single,
                    "sweep_status": summary["status_counts"],
                    "node_loss": lose_a_node(cluster, nodes, local_dir),
                },
                default=str,
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
