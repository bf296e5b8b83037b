"""The service's app over real HTTP for the tests that start no Ray: Uvicorn on
127.0.0.1 in a thread, and a Runner with fixed cluster totals that starts no job (the
Ray path, a job started, stopped and read, is tested in tests/cluster/test_service.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class FixedCluster:
    """A Runner with fixed totals that counts the queue's wake-ups; a test that reached a
    job would fail here."""

    def __init__(self, totals: dict[str, float] | None = None):
        self.totals = {"CPU": 8.0} if totals is None else totals
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1

    def stop_job(self, job_id: str) -> None:
        raise AssertionError(f"no job runs in these tests (asked to stop {job_id})")

    def job_logs(self, job_id: str) -> str:
        raise AssertionError(f"no job runs in these tests (asked for {job_id}'s log)")

    def cluster(self) -> tuple[dict, dict]:
        return dict(self.totals), dict(self.totals)


@contextlib.contextmanager
def served_over_http(app) -> Iterator[str]:
    """`app` served by Uvicorn on 127.0.0.1 in a thread; its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound first: the port is ours, no race for a free one
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
