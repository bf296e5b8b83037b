"""A real S3-compatible server on 127.0.0.1 for the tests (moto's server, not a mock).

pyarrow talks to it over HTTP exactly as it talks to AWS, so the tests exercise the
same client code, error paths and timeouts that a user's run does.

Import the fixtures into conftest.py:

    from s3server import s3_endpoint, s3_storage  # noqa: F401

The fake credentials below are set at import time (only where unset), before any
Ray cluster starts, so that every Ray process inherits them. Instance metadata
lookups are disabled: without them the AWS SDK would try 169.254.169.254 whenever
credentials or the region are missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
import uuid

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

TEST_BUCKET = "raygpt-test"

# The auth-enforcing server runs in a child process: moto keeps "is auth enforced" and
# every bucket in process-wide globals, so in this process it would switch auth on
# for the shared session server too. The child prints its port, then serves until
# its stdin closes (the parent stopped it, or died).
#
# It is ThreadedMotoServer's app behind one shim. AWS answers a request that carries
# no signature at all (no credentials anywhere) with 403 AccessDenied; moto 5.2
# crashes on it (KeyError 'HTTP_AUTHORIZATION', a 500), which no client would map to
# "credentials missing". The shim gives the AWS answer.
_CHILD = """
import sys, threading
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)

DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
          b'<Message>Access Denied</Message></Error>')
moto_app = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    signed = "HTTP_AUTHORIZATION" in environ or "X-Amz-Signature=" in environ.get(
        "QUERY_STRING", "")
    if signed or environ.get("PATH_INFO", "").startswith("/moto-api"):
        return moto_app(environ, start_response)
    start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                     ("Content-Length", str(len(DENIED)))])
    return [DENIED]

server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
server.shutdown()
"""

# What the auth server's one IAM user may do: everything in S3, nothing else.
_S3_ONLY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
)


class _ChildServer:
    """A moto server in a child process, with ThreadedMotoServer's `stop()`."""

    def __init__(self) -> None:
        # moto reads INITIAL_NO_AUTH_ACTION_COUNT at import; inf lets the setup calls
        # below through, and reset-auth then switches enforcement on.
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="inf")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the moto child server did not start (printed {line!r})")
        self.endpoint = f"127.0.0.1:{int(line)}"
        self.credentials: tuple[str, str] = ("", "")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def _boto3_client(service: str, endpoint: str, key: str = "testing", secret: str = "testing"):
    import boto3

    return boto3.client(
        service,
        endpoint_url=f"http://{endpoint}",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def start_server(auth: bool = False):
    """Start a moto S3 server on a free 127.0.0.1 port: `(server, "127.0.0.1:PORT")`.

    `server.stop()` stops it. With `auth=True` the server enforces AWS signatures and
    IAM permissions: a request with no credentials, or with keys it never issued
    (the default "testing" ones included), is refused with 403. Its one valid
    identity, allowed all of S3, is `server.credentials` (key id, secret).
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    if not auth:
        from moto.server import ThreadedMotoServer

        # port=0: the OS picks a free port while binding, so there is no race.
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        return server, f"127.0.0.1:{server.get_host_and_port()[1]}"
    server = _ChildServer()
    try:
        iam = _boto3_client("iam", server.endpoint)
        iam.create_user(UserName="raygpt")
        iam.put_user_policy(UserName="raygpt", PolicyName="s3", PolicyDocument=_S3_ONLY)
        key = iam.create_access_key(UserName="raygpt")["AccessKey"]
        server.credentials = (key["AccessKeyId"], key["SecretAccessKey"])
        # From now on every request is authenticated and authorised (moto's server-mode
        # switch, the one `set_initial_no_auth_action_count` uses).
        request = urllib.request.Request(
            f"http://{server.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            # Not urllib's default form type: Flask would parse the body away as a form.
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except BaseException:
        server.stop()
        raise
    return server, server.endpoint


def s3_uri(endpoint: str, bucket: str, prefix: str = "") -> str:
    """`s3://bucket/prefix?endpoint_override=127.0.0.1:PORT&scheme=http`."""
    path = f"{bucket}/{prefix.strip('/')}".rstrip("/")
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


def make_bucket(endpoint: str, name: str, credentials: tuple[str, str] | None = None) -> None:
    """Create bucket `name` (credentials: for an auth-enforcing server)."""
    _boto3_client("s3", endpoint, *(credentials or ("testing", "testing"))).create_bucket(
        Bucket=name
    )


def list_keys(endpoint: str, bucket: str, credentials: tuple[str, str] | None = None) -> list[str]:
    """Every object key in `bucket`, raw (pyarrow's directory markers included)."""
    client = _boto3_client("s3", endpoint, *(credentials or ("testing", "testing")))
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def list_buckets(endpoint: str, credentials: tuple[str, str] | None = None) -> list[str]:
    client = _boto3_client("s3", endpoint, *(credentials or ("testing", "testing")))
    return sorted(b["Name"] for b in client.list_buckets()["Buckets"])


@pytest.fixture(scope="session")
def s3_endpoint():
    """`127.0.0.1:PORT` of a moto S3 server that holds the bucket `raygpt-test`."""
    server, endpoint = start_server()
    make_bucket(endpoint, TEST_BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint) -> str:
    """A fresh, empty `s3://raygpt-test/<unique>?endpoint_override=...` URI."""
    return s3_uri(s3_endpoint, TEST_BUCKET, f"t-{uuid.uuid4().hex[:12]}")


AUTH_BUCKET = "raygpt-auth"


@pytest.fixture(scope="session")
def s3_auth_endpoint():
    """`127.0.0.1:PORT` of a moto S3 server that refuses requests without valid
    credentials; it holds the bucket `raygpt-auth`."""
    server, endpoint = start_server(auth=True)
    make_bucket(endpoint, AUTH_BUCKET, server.credentials)
    yield endpoint
    server.stop()
