"""Node-loss drill: a 2-worker-node Ray cluster on one machine loses the node that
hosts the training worker mid-run; the run must resume on the other node.

Run by tests/test_reliability.py in a subprocess (it needs its own Ray cluster):
    python tests/drills/node_loss.py STORAGE_DIR
Prints one JSON line: {"removed_node": ..., "summary": {...}}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
import ray._private.state
from ray.cluster_utils import Cluster

from raygpt import train
from raygpt.config import TrainConfig


def main(storage: str) -> None:
    # The head holds no CPU, so training workers must land on the two worker nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = TrainConfig(
        name="node-loss",
        storage_path=storage,
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
            run_dir = Path(storage) / "node-loss"
            deadline = time.time() + 240
            # Old checkpoints are pruned (keep 2), so wait for any one at all.
            while not list(run_dir.glob("checkpoint_0*")) and time.time() < deadline:
                time.sleep(0.1)
            # The worker holds its node's only CPU. (Not the State API: with another
            # Ray cluster on the machine it can query the wrong dashboard.)
            free = ray._private.state.available_resources_per_node()
            victim = next(n for n in workers if free[n.node_id].get("CPU", 0) == 0)
            node_id = victim.node_id
            print(f"[drill] removing node {node_id[:12]} that hosts the worker", flush=True)
            cluster.remove_node(victim, allow_graceful=False)
            removed["node"] = node_id
        except Exception as err:  # the JSON line then says no node was removed
            print(f"[drill] could not remove the node: {err!r}", flush=True)

    killer = threading.Thread(target=remove_training_node, daemon=True)
    killer.start()
    summary = train.run(cfg)
    killer.join(timeout=5)
    print(json.dumps({"removed_node": removed.get("node"), "summary": summary}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
