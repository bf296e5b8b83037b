"""Bad object storage fails in one line, before Ray starts, writing nothing: a real
S3-compatible server (moto's) on 127.0.0.1, unreachable, without the bucket, without
credentials. The runs on the bucket are in tests/cluster/test_object_storage.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _env(data_dir) -> dict[str, str]:
    return {**os.environ, "RAYGPT_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def s3_auth():
    """An S3 server that enforces signatures and IAM, holding the bucket `raygpt-auth`:
    (endpoint, the credentials that may list it)."""
    from s3server import make_bucket, start_server

    server, endpoint = start_server(auth=True)
    make_bucket(endpoint, "raygpt-auth", server.credentials)
    yield endpoint, server.credentials
    server.stop()


def _bad_storage_cases(endpoint: str, auth: tuple[str, tuple[str, str]]) -> dict[str, tuple]:
    """case: (storage URI, environment changes, fragments of the error line, and a listing
    of where that command could write on its server, which must not change)."""
    from s3server import list_buckets, list_keys, s3_uri

    auth_endpoint, credentials = auth
    return {
        # Nothing listens on port 9: the local data cache (checked for every case) is all
        # this command could write.
        "unreachable": (
            "s3://raygpt-test/x?endpoint_override=127.0.0.1:9&scheme=http",
            {},
            ["127.0.0.1:9"],
            lambda: [],
        ),
        # A missing bucket must be named, not created (pyarrow can create buckets).
        "no-bucket": (
            s3_uri(endpoint, "no-such-bucket", "x"),
            {},
            ["'no-such-bucket'"],
            lambda: list_buckets(endpoint),
        ),
        "no-credentials": (
            s3_uri(auth_endpoint, "raygpt-auth", "x"),
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            ["denied", "credentials"],
            lambda: list_keys(auth_endpoint, "raygpt-auth", credentials),
        ),
    }


@pytest.mark.parametrize("case", ["unreachable", "no-bucket", "no-credentials"])
@pytest.mark.parametrize("module", ["raygpt.train", "raygpt.sweep"])
def test_bad_storage_is_one_line_in_seconds_and_writes_nothing(
    case, module, s3_endpoint, s3_auth, tmp_path
):
    uri, env_changes, fragments, listing = _bad_storage_cases(s3_endpoint, s3_auth)[case]
    # A data cache of its own, empty: a command that prepared its data before checking
    # the storage would fill it.
    cache = tmp_path / "data"
    env = _env(cache)
    for key, value in env_changes.items():
        env.pop(key) if value is None else env.__setitem__(key, value)
    before = listing()
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", module, "--max-steps", "10", "--eval-interval", "5",
         "--storage-path", uri,
         "--address", "local"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.time() - started < 30
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in out.stderr and "Ray" not in out.stdout
    assert listing() == before
    if case == "no-bucket":
        assert "no-such-bucket" not in before
    # No dataset prepared, no local results: not one file under the cache or the working
    # folder (the cache's root may exist: the data layer creates it on first use).
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []
