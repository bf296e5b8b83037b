"""raygpt.storage on a local folder and on a real S3 server (moto, on 127.0.0.1).

No Ray here: `preflight` needs a cluster and is exercised by the Ray tests. Every
bad --storage-path is checked for its one line (naming the bad value) and for
writing nothing: no folder created, the bucket listing unchanged.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from s3server import TEST_BUCKET, list_buckets, list_keys, make_bucket, s3_uri, start_server

from raygpt import results, storage
from raygpt.cluster import storage_check
from raygpt.errors import UserError
from raygpt.storage import Storage, resolve


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """A fresh, empty storage root: a local folder, or a prefix on the moto server."""
    if request.param == "local":
        return resolve(str(tmp_path / "results"))
    return resolve(request.getfixturevalue("s3_storage"))


@pytest.fixture(scope="module")
def s3_auth():
    """An S3 server that enforces signatures and IAM: (endpoint, valid credentials)."""
    server, endpoint = start_server(auth=True)
    make_bucket(endpoint, "authed", server.credentials)
    yield endpoint, server.credentials
    server.stop()


def _without_aws_credentials(monkeypatch, tmp_path) -> None:
    """No credentials anywhere the AWS SDK looks (env, profile files, metadata)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line_error(storage_path: str) -> str:
    with pytest.raises(UserError) as info:
        resolve(storage_path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------
# round trips, on both kinds of storage


def test_write_read_list_delete(store):
    assert not store.exists(store.root) or store.list_dir(store.root) == []
    store.write_bytes(store.path("run", "a.json"), b"one")
    store.write_bytes(store.path("run/sub/b.bin"), b"\x00two")
    assert store.read_bytes(store.path("run", "a.json")) == b"one"
    assert store.read_bytes(store.path("run", "sub", "b.bin")) == b"\x00two"
    assert store.list_dir(store.root) == ["run"]
    assert store.list_dir(store.path("run")) == ["a.json", "sub"]
    assert store.list_dir(store.path("missing")) == []
    assert store.exists(store.path("run", "a.json"))
    assert store.is_dir(store.path("run", "sub"))
    assert not store.is_dir(store.path("run", "a.json"))
    assert not store.exists(store.path("run", "nothing"))

    store.write_bytes(store.path("run", "a.json"), b"replaced")
    assert store.read_bytes(store.path("run", "a.json")) == b"replaced"

    store.delete_file(store.path("run", "a.json"))
    store.delete_file(store.path("run", "a.json"))  # already gone: fine
    assert not store.exists(store.path("run", "a.json"))
    with pytest.raises(FileNotFoundError):
        store.read_bytes(store.path("run", "a.json"))

    store.delete_dir(store.path("run"))
    store.delete_dir(store.path("run"))  # already gone: fine
    assert not store.exists(store.path("run", "sub", "b.bin"))
    assert store.list_dir(store.path("run")) == []


def test_upload_and_download(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.upload_file(src, store.path("run", "ckpt", "state.pt"))
    store.upload_file(str(src), store.path("run", "ckpt", "nested", "copy.pt"))
    store.write_bytes(store.path("run", "ckpt", "meta.json"), b"{}")
    assert store.read_bytes(store.path("run", "ckpt", "state.pt")) == src.read_bytes()

    out = tmp_path / "downloaded"
    store.download_dir(store.path("run", "ckpt"), out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "meta.json",
        "nested/copy.pt",
        "state.pt",
    ]
    assert (out / "state.pt").read_bytes() == src.read_bytes()
    assert (out / "meta.json").read_bytes() == b"{}"


def test_pickled_storage_reads_the_same_object(store):
    store.write_bytes(store.path("x.txt"), b"shared")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri and copy.root == store.root
    assert copy.read_bytes(copy.path("x.txt")) == b"shared"
    copy.write_bytes(copy.path("y.txt"), b"back")
    assert store.read_bytes(store.path("y.txt")) == b"back"


def test_a_parquet_read_is_retried_on_object_storage_and_not_locally(store, monkeypatch):
    """An object read overlapping a rewrite can hold bytes of both versions, so a read of
    bad bytes there is retried; a local file is swapped by a rename and is read once."""
    path = store.path(results.TRIALS_FILE)
    store.write_bytes(path, b"PAR1 torn")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"step": [1, 2]}), sink)
    reads: list[str] = []
    read_bytes = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda s, p: reads.append(p) or read_bytes(s, p))
    # The writer finishes while the reader waits to try again.
    monkeypatch.setattr(results.time, "sleep", lambda s: store.write_bytes(path, sink.getvalue()))
    if store.is_local:
        with pytest.raises(pa.ArrowInvalid):
            results.read_table(store, path)
        assert reads == [path]
    else:
        assert results.read_table(store, path).column("step").to_pylist() == [1, 2]
        assert reads == [path, path]


# ---------------------------------------------------------------------------------------
# local specifics


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    store = resolve(str(tmp_path / "results"))
    target = store.path("run", "trials.parquet")
    for i in range(20):
        store.write_bytes(target, f"version {i}".encode())
    assert os.listdir(os.path.dirname(target)) == ["trials.parquet"]
    assert store.read_bytes(target) == b"version 19"
    mode = os.stat(target).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # readable like any file the user writes, not 0600

    # A write that fails before the rename leaves the old file whole and no temp file.
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes(target, b"half")
    with pytest.raises(OSError, match="disk full"):
        store.upload_file(__file__, target)
    monkeypatch.undo()
    assert os.listdir(os.path.dirname(target)) == ["trials.parquet"]
    assert store.read_bytes(target) == b"version 19"


def test_local_resolve_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    home = resolve("~/ray_results")
    assert home.uri == home.root == str(tmp_path / "ray_results")
    assert home.is_local
    assert resolve("rel/dir").root == str(tmp_path / "rel" / "dir")
    assert resolve(f"file://{tmp_path}/a/../b").root == str(tmp_path / "b")
    assert resolve(f"file://localhost{tmp_path}/c").root == str(tmp_path / "c")
    assert resolve(tmp_path / "d").root == str(tmp_path / "d")  # a Path is fine too
    assert not (tmp_path / "ray_results").exists()  # checked, not created
    assert home.path() == home.root
    assert home.path("run", "a/b.txt") == f"{tmp_path}/ray_results/run/a/b.txt"
    assert home.path("/run/", "", "x") == f"{tmp_path}/ray_results/run/x"
    assert home.display() == str(tmp_path / "ray_results")
    assert home.display(home.path("run")) == f"{tmp_path}/ray_results/run"
    assert resolve("/").path("x") == "/x"


def test_local_path_that_is_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    message = _one_line_error(str(file))
    assert str(file) in message and "is a file" in message
    assert file.read_text() == "x"


def test_local_path_under_a_file_is_not_creatable(tmp_path):
    file = tmp_path / "x" / "file"
    file.parent.mkdir()
    file.write_text("x")
    message = _one_line_error(str(file / "sub" / "results"))
    assert str(file / "sub" / "results") in message
    assert f"{file} is a file" in message
    assert sorted(os.listdir(tmp_path)) == ["x"] and os.listdir(file.parent) == ["file"]


def test_local_unwritable_folder(tmp_path, monkeypatch):
    # Root may write anywhere, so stand in for a folder this user may not write.
    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)
    message = _one_line_error(str(tmp_path / "new" / "results"))
    assert str(tmp_path / "new" / "results") in message and "not writable" in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "bad, expect",
    [
        ("hdfs://namenode/results", "unsupported scheme 'hdfs://'"),
        ("http://example.com/results", "unsupported scheme 'http://'"),
        ("s3:bucket/results", "write it as s3://bucket/results"),
        ("file://host/results", "file:///ABSOLUTE/PATH"),
        ("", "--storage-path is empty"),
        ("s3:///results", "names no bucket"),
        ("s3://raygpt-test/x?endpoint_override=127.0.0.1:9&regoin=eu", "unknown option 'regoin'"),
        ("s3://raygpt-test/x?scheme=ftp", "scheme=ftp must be http or https"),
        ("s3://raygpt-test/x?anonymous=maybe", "anonymous=maybe must be true or false"),
        ("s3://raygpt-test/x?connect_timeout=soon", "connect_timeout=soon must be a number"),
        ("s3://raygpt-test/x?region=a&region=b", "gives region twice"),
        ("s3://raygpt-test/x?endpoint_override=https://h:1&scheme=http", "keep one"),
        ("gs://bucket/x?retry_limit=3", "unknown option 'retry_limit'"),
    ],
)
def test_bad_storage_paths(bad, expect, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _one_line_error(bad)
    assert expect in message
    assert bad.split("?")[0] in message or not bad
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "bad", ["s3://AKIAKEY:hunter2@bucket/x", "s3://bucket/x?secret_key=hunter2&region=us"]
)
def test_credentials_in_the_path_are_refused_and_not_echoed(bad):
    message = _one_line_error(bad)
    assert "hunter2" not in message and "AWS_ACCESS_KEY_ID" in message


# ---------------------------------------------------------------------------------------
# object stores


def test_s3_uri_forms(s3_endpoint):
    store = resolve(f"s3://{TEST_BUCKET}//runs/a/?endpoint_override=http://{s3_endpoint}")
    assert store.root == f"{TEST_BUCKET}/runs/a"
    assert store.uri == f"s3://{TEST_BUCKET}/runs/a?endpoint_override={s3_endpoint}&scheme=http"
    assert not store.is_local
    assert store.path("run", "x/y.json") == f"{TEST_BUCKET}/runs/a/run/x/y.json"
    assert store.display() == f"s3://{TEST_BUCKET}/runs/a"
    assert store.display(store.path("run")) == f"s3://{TEST_BUCKET}/runs/a/run"
    # Workers and later commands rebuild the same storage from the uri alone.
    again = resolve(store.uri, check=False)
    assert (again.uri, again.root) == (store.uri, store.root)
    assert isinstance(again.fs, pafs.S3FileSystem)
    bucket_only = resolve(s3_uri(s3_endpoint, TEST_BUCKET))
    assert bucket_only.root == TEST_BUCKET and bucket_only.path("r") == f"{TEST_BUCKET}/r"


def test_s3_fixture_gives_an_empty_prefix_of_the_test_bucket(s3_storage, s3_endpoint):
    # Seen by another client (boto3): nothing under the prefix yet, and a write through
    # the URI lands there, in the session server's test bucket.
    store = resolve(s3_storage)
    bucket, prefix = store.root.split("/", 1)
    assert bucket == TEST_BUCKET
    assert [k for k in list_keys(s3_endpoint, TEST_BUCKET) if k.startswith(f"{prefix}/")] == []
    assert store.list_dir(store.root) == []
    store.write_bytes(store.path("run", "a.json"), b"{}")
    assert f"{prefix}/run/a.json" in list_keys(s3_endpoint, TEST_BUCKET)


def test_s3_check_leaves_nothing_behind(s3_endpoint):
    before = list_keys(s3_endpoint, TEST_BUCKET)
    for prefix in ("fresh", "fresh/deeper/still"):
        resolve(s3_uri(s3_endpoint, TEST_BUCKET, prefix))
    assert list_keys(s3_endpoint, TEST_BUCKET) == before


def test_s3_root_that_is_an_object(s3_endpoint, s3_storage):
    resolve(s3_storage).write_bytes(resolve(s3_storage).path("file"), b"x")
    bad = s3_storage.replace("?", "/file?")
    before = list_keys(s3_endpoint, TEST_BUCKET)
    message = _one_line_error(bad)
    assert "is an object (a file)" in message and bad.split("?")[0] in message
    assert list_keys(s3_endpoint, TEST_BUCKET) == before


def test_s3_unreachable_endpoint_fails_fast():
    endpoint = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    message = _one_line_error(s3_uri(endpoint, TEST_BUCKET, "results"))
    assert time.monotonic() - start < 10
    assert message.startswith(f"cannot reach s3://{TEST_BUCKET}/results (endpoint {endpoint}")
    assert "refused" in message and "endpoint_override" in message


def test_s3_missing_bucket(s3_endpoint):
    buckets = list_buckets(s3_endpoint)
    message = _one_line_error(s3_uri(s3_endpoint, "no-such-bucket", "results"))
    assert "bucket 'no-such-bucket' does not exist" in message and s3_endpoint in message
    assert "aws s3 mb s3://no-such-bucket" in message
    assert list_buckets(s3_endpoint) == buckets


def test_s3_missing_credentials_are_denied(s3_auth, monkeypatch, tmp_path):
    endpoint, credentials = s3_auth
    _without_aws_credentials(monkeypatch, tmp_path)
    message = _one_line_error(s3_uri(endpoint, "authed", "results"))
    assert message.startswith("access to s3://authed/results denied")
    assert "AWS_ACCESS_KEY_ID" in message
    assert list_keys(endpoint, "authed", credentials) == []


def test_s3_unknown_credentials_are_denied(s3_auth, monkeypatch):
    endpoint, credentials = s3_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert "denied" in _one_line_error(s3_uri(endpoint, "authed", "results"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    assert "denied" in _one_line_error(s3_uri(endpoint, "authed", "results"))
    assert list_keys(endpoint, "authed", credentials) == []


def test_s3_valid_credentials_on_the_auth_server(s3_auth, monkeypatch):
    # The same server lets the right key in: the denials above are about credentials.
    endpoint, credentials = s3_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials[1])
    store = resolve(s3_uri(endpoint, "authed", "results"))
    store.write_bytes(store.path("a"), b"ok")
    assert list_keys(endpoint, "authed", credentials) == ["results/a"]
    store.delete_dir(store.root)


def test_gcs_uri_builds_offline():
    store = resolve(
        "gcs://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&project_id=p&anonymous=1",
        check=False,
    )
    assert isinstance(store.fs, pafs.GcsFileSystem)
    assert (
        store.uri
        == "gs://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&anonymous=true&project_id=p"
    )
    assert store.display(store.path("x")) == "gs://bucket/runs/x"
    assert pickle.loads(pickle.dumps(store)).uri == store.uri


def test_gcs_unreachable_endpoint():
    endpoint = f"127.0.0.1:{_closed_port()}"
    uri = f"gs://bucket/runs?endpoint_override={endpoint}&scheme=http&anonymous=true"
    start = time.monotonic()
    message = _one_line_error(uri + "&retry_limit_seconds=1")
    assert time.monotonic() - start < 10
    assert message.startswith(f"cannot reach gs://bucket/runs (endpoint {endpoint}")


# ---------------------------------------------------------------------------------------
# preflight's per-node half (the Ray half runs in the Ray tests)


def test_node_check_reads_the_driver_marker_and_writes_its_own(store):
    marker, own = store.path(".raygpt-preflight", "t", "driver"), store.path("t-node")
    assert "that the driver wrote" in storage_check._node_check(store, marker, own, "tok")
    assert not store.exists(own)  # a node that cannot see the marker writes nothing
    store.write_bytes(marker, b"tok")
    assert storage_check._node_check(pickle.loads(pickle.dumps(store)), marker, own, "tok") == ""
    assert store.read_bytes(own) == b"tok"
    storage_check._remove_preflight(store, store.path(".raygpt-preflight", "t"))
    assert not store.exists(store.path(".raygpt-preflight"))


def test_node_check_names_the_problem_on_unreachable_storage():
    store = resolve(s3_uri(f"127.0.0.1:{_closed_port()}", "bucket", "runs"), check=False)
    problem = storage_check._node_check(store, store.path("m"), store.path("o"), "tok")
    assert problem.startswith("cannot reach s3://bucket/runs")


def test_fixture_credentials_reach_child_processes(s3_storage, s3_endpoint):
    # Ray's workers are child processes: the test credentials s3server sets at import
    # must reach them. Without any, the server refuses the child's unsigned requests.
    code = (
        "import sys; from raygpt.storage import resolve; s = resolve(sys.argv[1]); "
        "s.write_bytes(s.path('from-child'), b'x')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, s3_storage], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    prefix = resolve(s3_storage).root.split("/", 1)[1]
    assert f"{prefix}/from-child" in list_keys(s3_endpoint, TEST_BUCKET)


def test_storage_is_a_plain_value(tmp_path):
    a, b = resolve(str(tmp_path)), resolve(str(tmp_path))
    assert a.uri == b.uri and a.root == b.root
    with pytest.raises(AttributeError):
        a.root = "/elsewhere"  # frozen: a Storage shipped to workers cannot drift
    assert Path(a.root).is_absolute()
