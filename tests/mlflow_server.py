"""A real MLflow tracking server that wants a password (mlflow.server's own app behind an
HTTP Basic gate, in a child process), and the CLI runs and file checks its tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_IN_PROCESS

SECRET = "hunter2"

USER = "raygpt"

# MLflow's tracking server app (mlflow.server's Flask app, the REST API `mlflow server`
# serves) in a child process, behind a gate that answers 401 unless the request carries
# HTTP Basic credentials USER:PASSWORD (argv[1]). The child prints its port, then serves
# until its stdin closes.
MLFLOW_CHILD = """
import base64, sys, threading
from werkzeug.serving import make_server
from mlflow.server import app as mlflow_app

WANT = "Basic " + base64.b64encode(sys.argv[1].encode()).decode()
DENIED = b'{"error_code": "UNAUTHENTICATED", "message": "wrong or missing credentials"}'

def app(environ, start_response):
    if environ.get("HTTP_AUTHORIZATION") == WANT:
        return mlflow_app(environ, start_response)
    start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(DENIED)))])
    return [DENIED]

server = make_server("127.0.0.1", 0, app, threaded=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
server.shutdown()
"""


@pytest.fixture(scope="module", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory):
    """(port, its file store folder) of a real MLflow tracking server that wants a password."""
    root = tmp_path_factory.mktemp("mlflow-server")
    env = {
        **os.environ,
        "_MLFLOW_SERVER_FILE_STORE": (root / "store").as_uri(),  # what `mlflow server` sets
        "_MLFLOW_SERVER_ARTIFACT_ROOT": str(root / "artifacts"),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    with open(root / "server.log", "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", MLFLOW_CHILD, f"{USER}:{SECRET}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), (root / "server.log").read_text()
        yield int(line), root / "store"
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def tiny_flags(in_process: bool = True) -> list[str]:
    values = TINY_IN_PROCESS | {"compile": "false"}
    return [
        f"--{k.replace('_', '-')}={v}" for k, v in values.items() if in_process or k != "in_process"
    ]


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


def run_cli(module: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGV`: every line it, MLflow, W&B and Ray print, captured."""
    environ = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    # The default experiment; credentials from the URI alone; MLflow's run links printed
    # as MLflow prints them; a private Ray cluster.
    for key in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        environ.pop(key, None)
    for key in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "RAY_ADDRESS"):
        environ.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
