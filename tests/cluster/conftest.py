"""The multi-node drill, run once for the tests that read it: a Ray cluster of a CPU-less
head and two 1-CPU nodes (tests/cluster/drills/two_nodes.py) trains across nodes onto S3,
sweeps on both, then loses the node that hosts a run's worker. It starts in the
background with the session's first test and is read when a test needs its result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO
from s3server import TEST_BUCKET, s3_uri


@dataclass(frozen=True)
class Drill:
    result: dict  # the drill's JSON line
    output: str  # its stdout and stderr
    s3_storage: str  # where the cross-node runs and the sweep wrote
    local_dir: Path  # where the node-loss run wrote


DRILL = REPO / "tests/cluster/drills/two_nodes.py"
DRILL_UP = "[drill] cluster up at"  # what the drill prints once its cluster is up (CLUSTER_UP)
DRILL_TIMEOUT_S = 700


@dataclass
class DrillProcess:
    process: subprocess.Popen
    log: Path  # its stdout and stderr
    storage: str
    local_dir: Path


@pytest.fixture(scope="session")
def drill_process(s3_endpoint, data_dir, tmp_path_factory) -> Iterator[DrillProcess]:
    """The drill, started in the background: most of its ~80 s is Ray starting nodes and
    worker groups and noticing a lost node, time the tests beside it use."""
    storage = s3_uri(s3_endpoint, TEST_BUCKET, f"drill-{uuid.uuid4().hex[:12]}")
    local_dir = tmp_path_factory.mktemp("node-loss")
    log = tmp_path_factory.mktemp("drill") / "drill.log"
    env = {**os.environ, "RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(DRILL), storage, str(local_dir)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    # Until its cluster is up, the drill's head is this machine's recorded current cluster
    # (Ray's Cluster() writes the record, the drill then drops it): no test starts before.
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if DRILL_UP in log.read_text(errors="replace"):
            break
        time.sleep(0.2)
    yield DrillProcess(process, log, storage, local_dir)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session", autouse=True)
def drill_started_first(request) -> None:
    """Starts the drill with the session's first test, where a test of the session needs it."""
    if any("two_node_drill" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("drill_process")


@pytest.fixture(scope="session")
def two_node_drill(drill_process) -> Drill:
    try:
        drill_process.process.wait(timeout=DRILL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(drill_process.process.pid, signal.SIGKILL)
        drill_process.process.wait()
    output = drill_process.log.read_text(errors="replace")
    assert drill_process.process.returncode == 0, output[-6000:]
    # Ray may print worker lines after it; the drill's own line is the JSON object.
    result = json.loads(next(x for x in output.splitlines()[::-1] if x.startswith("{")))
    return Drill(result, output, drill_process.storage, drill_process.local_dir)


# How long a finished test's actors and placement groups get to release the session
# cluster's CPUs (Ray frees them asynchronously, within seconds here) before the guard
# removes them, and how long what it removed gets to let go.
RELEASE_WAIT_S = 20.0
REMOVED_WAIT_S = 60.0


@pytest.fixture(autouse=True)
def session_cluster_released(request):
    """After each test on the session's cluster, every CPU is free again.

    A test that leaves an actor or placement group holding CPUs would make every later
    worker group wait: the guard removes them (or, when nothing Ray can name holds them,
    restarts the cluster), so the rest of the suite runs, and warns with the test's name
    and what it left."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import warnings

    import ray
    from ray.util import state

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)

    def released(within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        return ray.available_resources().get("CPU", 0) >= total

    if released(RELEASE_WAIT_S):
        return
    held = ray.available_resources().get("CPU", 0)
    left = []
    for actor in state.list_actors(filters=[("state", "=", "ALIVE")], detail=True):
        if (actor.required_resources or {}).get("CPU"):
            left.append(f"actor {actor.class_name} {actor.required_resources}")
            if actor.name:  # an anonymous actor goes with its placement group, below
                ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace))
    for group in state.list_placement_groups(filters=[("state", "=", "CREATED")]):
        left.append(f"placement group {group.placement_group_id}")
        ray.util.remove_placement_group(_placement_group(group.placement_group_id))
    # With nothing removed, waiting longer frees nothing: restart at once.
    freed = released(REMOVED_WAIT_S) if left else False
    if not freed:
        # Nothing holds them that Ray can name: the raylet lost count of a lease (a
        # worker killed mid-task). A fresh cluster serves the rest of the suite; the
        # tests reach it through the same `ray` module.
        from raygpt.cluster import connect

        ray.shutdown()
        connect.connect("local")
    message = (
        f"{request.node.nodeid} left the session cluster with {held:g} of {total:g} CPU "
        f"free after {RELEASE_WAIT_S:g} s; removed {left or 'nothing it could find'}"
        + ("" if freed else "; the CPUs stayed held, so the session's cluster was restarted")
    )
    # Now, on the console, and again in the warnings summary at the end.
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n--- {message}")
    warnings.warn(message, stacklevel=1)


def _placement_group(group_id: str):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(group_id))
