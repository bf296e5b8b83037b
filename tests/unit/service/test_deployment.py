"""`deployment.start` checks its database before it touches Ray: an unreachable one is
one line, its password masked, and no cluster is joined. The service on a real cluster
runs in tests/cluster/test_service.py."""

from __future__ import annotations

import socket

import pytest
from conftest import one_line

from raygpt.errors import UserError
from raygpt.service import deployment

SECRET = "hunter2-do-not-print"


def test_an_unreachable_database_fails_start_in_one_line_before_ray(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://svc:{SECRET}@127.0.0.1:{port}/raygpt"
    with pytest.raises(UserError) as err:
        deployment.start(str(tmp_path), url, port=port)
    line = one_line(err)
    assert "cannot reach database" in line and SECRET not in line


def test_a_storage_uri_with_a_credential_is_refused_before_ray(tmp_path):
    uri = f"s3://bucket/results?secret_key={SECRET}&endpoint_override=http://127.0.0.1:9"
    with pytest.raises(UserError) as err:
        deployment.start(uri, str(tmp_path / "service.db"))
    line = one_line(err)
    assert "holds a credential" in line and SECRET not in line


def test_a_database_password_reaches_the_replica_through_a_private_file(tmp_path, monkeypatch):
    """Serve keeps a deployment's arguments in the cluster's store: a URL with a password
    goes to the replica as a 0600 file's path, and one without as itself."""
    monkeypatch.setattr(deployment, "DB_URL_FILE", str(tmp_path / "private" / "db-url"))
    url = f"postgresql://svc:{SECRET}@127.0.0.1:5432/raygpt"
    given, path = deployment._secret_free(url)
    assert given is None and SECRET not in path
    assert (tmp_path / "private" / "db-url").read_text().strip() == url
    assert (tmp_path / "private" / "db-url").stat().st_mode & 0o777 == 0o600
    assert deployment._secret_free("postgresql://svc@127.0.0.1/raygpt") == (
        "postgresql://svc@127.0.0.1/raygpt",
        None,
    )
    assert deployment._secret_free(str(tmp_path / "service.db")) == (
        str(tmp_path / "service.db"),
        None,
    )
