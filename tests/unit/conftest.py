"""tests/unit/ starts no Ray: a test that starts a cluster (in this process or in a
subprocess it runs) fails here, naming the folder it belongs in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def _ray_sessions() -> set[str]:
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    return {p.name for p in root.glob("session_2*")} if root.is_dir() else set()


@pytest.fixture(autouse=True)
def _starts_no_ray():
    ray = sys.modules.get("ray")
    joined_before = bool(ray and ray.is_initialized())
    before = _ray_sessions()
    yield
    ray = sys.modules.get("ray")
    started = sorted(_ray_sessions() - before)
    joined = bool(ray and ray.is_initialized()) and not joined_before
    assert not started and not joined, (
        f"this test started Ray ({started or 'ray.init in this process'}); "
        "a test that starts Ray belongs in tests/cluster/"
    )
