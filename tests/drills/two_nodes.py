"""Two-node drill: a Ray cluster of a CPU-less head and two 1-CPU nodes on one machine.

Run by tests/test_object_storage.py in a subprocess (it needs its own Ray cluster):
    python tests/drills/two_nodes.py STORAGE_URI
With one CPU per node, a 2-worker run (SPREAD) has its ranks on different
nodes, and a sweep of two concurrent 1-worker trials has its trials on
different nodes. Prints one JSON line with the node of every worker and trial.
"""

from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from raygpt import sweep, train
from raygpt.config import TrainConfig

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


def main(storage: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        spread = train.run(
            TrainConfig(
                name="spread", storage_path=storage, num_workers=2, batch_size=8,
                placement_strategy="SPREAD", **SHORT,
            ).validate()
        )  # fmt: skip
        single = train.run(
            TrainConfig(name="single", storage_path=storage, batch_size=16, **SHORT).validate()
        )
        summary = sweep.run(
            *sweep.configs_from_argv([*SWEEP, "--name", "sweep", "--storage-path", storage])
        )
        print(
            json.dumps(
                {
                    "nodes": [n.node_id for n in nodes],
                    "spread": spread,
                    "single": single,
                    "sweep_status": summary["status_counts"],
                },
                default=str,
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
