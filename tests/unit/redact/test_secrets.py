"""Secrets in URIs stay out of everything raygpt shows or keeps.

`raygpt.redact` on its own (a table of inputs and what people see); then the CLI with
storage URIs that hold a secret (exit 2, the secret nowhere in the output, nothing
written); then real tiny in-process runs whose --mlflow URI carries a password (logging
to W&B offline too), and one with the wrong password. The tracking server is MLflow's
own (the REST API of mlflow.server over a file store) in a child process, behind a gate
that answers 401 without that user and password, so the metrics arriving prove the
credentials reached the client, while the password shows up nowhere: not in the
output, not in any file of the storage folder (run.json, Parquet footers, TensorBoard
events, checkpoints), not in W&B's run file, not in what the tracking server stored.
The sweep's case is in tests/cluster/test_secrets.py.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, step_metadata
from mlflow_server import (
    SECRET,
    USER,
    files_holding,
    run_cli,
    tiny_flags,
)
from s3server import TEST_BUCKET, list_keys, s3_uri

from raygpt import checkpoint
from raygpt.errors import UserError, exit_on_user_error
from raygpt.redact import MASK, is_secret_name, redact, redact_config
from raygpt.train import cli as train_cli
from raygpt.train import trackers


@pytest.mark.parametrize(
    "text, shown",
    [
        # userinfo: the password goes, the user stays; a lone token-as-user goes whole
        ("http://user:hunter2@host:5000", "http://user:***@host:5000"),
        ("foo://user:hunter2@x", "foo://user:***@x"),
        ("https://ghp_hunter2@github.com/o/r", "https://***@github.com/o/r"),
        ("http://u:hun@ter2@host/p", "http://u:***@host/p"),  # a raw '@' in the password
        ("http://u:hunter2%40x@host", "http://u:***@host"),
        ("--mlflow 'http://u:hunter2@h:1': refused", "--mlflow 'http://u:***@h:1': refused"),
        # query values of secret names, whatever else the query holds
        (
            "s3://b/p?endpoint_override=http://127.0.0.1:9000&secret_key=hunter2&region=us",
            "s3://b/p?endpoint_override=http://127.0.0.1:9000&secret_key=***&region=us",
        ),
        ("http://h:5000/?token=hunter2", "http://h:5000/?token=***"),
        ("file:///tmp/mlruns?access_token=hunter2#x", "file:///tmp/mlruns?access_token=***#x"),
        ("https://s.blob/c?sv=1&sig=hunter2%3D&se=2", "https://s.blob/c?sv=1&sig=***&se=2"),
        ("https://b.s3/k?X-Amz-Signature=hunter2", "https://b.s3/k?X-Amz-Signature=***"),
        ("https://api/x?key=hunter2&q=1", "https://api/x?key=***&q=1"),
        ("x?api_key=hunter2;password=hunter2", "x?api_key=***;password=***"),
        ("x?SESSION-TOKEN=hunter2", "x?SESSION-TOKEN=***"),
        # an error line that quotes a URI and goes on after a ':'
        (
            "--storage-path s3://b?anonymous=maybe&session_token=hunter2: must be true",
            "--storage-path s3://b?anonymous=maybe&session_token=***: must be true",
        ),
        # name=value and quoted pairs in prose, flags, environment-style names
        ("--secret-key=hunter2 given", "--secret-key=*** given"),
        ("MLFLOW_TRACKING_PASSWORD=hunter2", "MLFLOW_TRACKING_PASSWORD=***"),
        ("{'token': 'hunter2', 'n': 1}", "{'token': '***', 'n': 1}"),
        ('{"client_secret": "hunter2"}', '{"client_secret": "***"}'),
        ("Authorization: Bearer hunter2.x", "Authorization: Bearer ***"),
        # what is no secret stays as it is
        ("http://host:5000/path?run=1", "http://host:5000/path?run=1"),
        ("s3://bucket/prefix?endpoint_override=h:9&scheme=http", None),
        ("user@example.com wrote /tmp/x", None),
        ("eos_token=50256 tokens_seen=96 max_tokens=3", None),
        ("a key=value pair; signature checked", "a key=*** pair; signature checked"),
        ("Basic authentication failed", None),
        ("token=", None),
        ("", None),
    ],
)
def test_redact(text, shown):
    assert redact(text) == (text if shown is None else shown)
    assert redact(redact(text)) == redact(text)  # masking a masked text changes nothing


def test_secret_names():
    for name in ("password", "secret_key", "AWS_SECRET_ACCESS_KEY", "my-api-key", "token"):
        assert is_secret_name(name)
    for name in ("eos_token", "tokens_seen", "key", "signature", "tokenizer", "keep_checkpoints"):
        assert not is_secret_name(name)  # config and record keys raygpt has
    assert is_secret_name("key", query=True) and is_secret_name("sig", query=True)


def test_redact_config():
    config = {
        "mlflow": "http://u:hunter2@h:5000",
        "storage_path": "s3://b/p?endpoint_override=h:9&scheme=http",
        "password": "hunter2",
        "api_key": 12345,
        "token": None,
        "eos_token": 50256,
        "key": "val_loss",  # a record's "key" field is no secret
        "cooldown_at": (4, 8),
        "nested": [{"secret": {"a": "hunter2"}}, "https://x?sig=hunter2"],
    }
    assert redact_config(config) == {
        "mlflow": "http://u:***@h:5000",
        "storage_path": "s3://b/p?endpoint_override=h:9&scheme=http",
        "password": MASK,
        "api_key": MASK,
        "token": None,
        "eos_token": 50256,
        "key": "val_loss",
        "cooldown_at": (4, 8),
        "nested": [{"secret": MASK}, "https://x?sig=***"],
    }
    assert config["mlflow"] == "http://u:hunter2@h:5000"  # a copy: the original is intact


def test_the_error_printer_masks_whatever_raised(capsys):
    @exit_on_user_error
    def main(argv=None):
        raise UserError("cannot reach http://u:hunter2@h:1/?token=hunter2; check it")

    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: cannot reach http://u:***@h:1/?token=***; check it\n"


def _cli_error(argv: list[str], capfd) -> str:
    """Run raygpt.train's CLI in this process; its one `error:` line (exit 2)."""
    assert train_cli.main(argv) == 2
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "query, expect",
    [
        ("&secret_key=hunter2", "secret_key does not belong in the path"),
        ("&regoin=eu&secret_key=hunter2", "secret_key does not belong in the path"),
        ("&access_key=AKIA&secret_key=hunter2", "access_key does not belong in the path"),
        # an option error that quotes the whole URI, a proxy password in it
        ("&proxy_options=http://u:hunter2@proxy:3128&anonymous=maybe", "http://u:***@proxy:3128"),
        ("&connect_timeout=soon&token=hunter2", "token=***"),
    ],
)
def test_storage_uri_secrets_are_not_echoed(query, expect, s3_endpoint, tmp_path, capfd):
    uri = s3_uri(s3_endpoint, TEST_BUCKET, f"secrets-{tmp_path.name}") + query
    before = list_keys(s3_endpoint, TEST_BUCKET)
    line = _cli_error(["--storage-path", uri, "--name", "r"], capfd)
    assert expect in line
    assert list_keys(s3_endpoint, TEST_BUCKET) == before  # nothing written


@pytest.mark.parametrize(
    "uri, expect",
    [
        ("foo://user:hunter2@x/results", "--storage-path foo://user:***@x/results uses the "),
        ("s3:user:hunter2@bucket/x", "write it as s3://user:***@bucket/x"),
        ("s3://AKIA:hunter2@bucket/x", "credentials do not belong in the path"),
        ("s3://bucket/x?endpoint_override=http://u:hunter2@h:9000", "endpoint_override holds"),
        ("s3://bucket/x?proxy_options=http://u:hunter2@proxy:3128", "proxy_options holds"),
        ("gs://bucket/x?retry_limit=3&access_token=hunter2", "access_token does not belong"),
    ],
)
def test_bad_storage_uris_with_credentials(uri, expect, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expect in _cli_error(["--storage-path", uri, "--name", "r"], capfd)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def secret_run(data_dir, mlflow_server, tmp_path_factory):
    """One tiny in-process run logging to the password-protected server (and to W&B,
    offline); (its storage folder, the W&B folder, the tracking URI, the output)."""
    port, _ = mlflow_server
    root = tmp_path_factory.mktemp("secret-run")
    uri = f"http://{USER}:{SECRET}@127.0.0.1:{port}"
    # The gate works: without the password the server refuses.
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search")
    argv = ["--storage-path", str(root / "results"), "--name", "secret", "--mlflow", uri]
    result = run_cli(
        "raygpt.train",
        [*argv, "--wandb", "raygpt-tests", *tiny_flags()],
        WANDB_MODE="offline",
        WANDB_DIR=str(root),
        WANDB_SILENT="true",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "results", root, uri, result.stdout + result.stderr


def test_mlflow_password_reaches_the_server_and_nothing_else(secret_run, mlflow_server):
    import mlflow

    _, _, uri, output = secret_run
    _, store = mlflow_server
    assert SECRET not in output and "[raygpt] done: step 12" in output
    # The server got the run: the client had the URI's credentials.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(trackers.DEFAULT_MLFLOW_EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "secret" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    # Its parameters name the server, without the password.
    shown = f"http://{USER}:{MASK}@127.0.0.1:{uri.rsplit(':', 1)[1]}"
    assert run.data.params["mlflow"] == shown and run.data.params["n_embd"] == "32"
    assert not [k for k, v in run.data.params.items() if SECRET in v]
    assert files_holding(store, SECRET.encode()) == []  # tags, params, names on the server


def test_mlflow_password_is_in_no_file_of_the_run(secret_run):
    results, wandb_dir, uri, _ = secret_run
    run = results / "secret"
    # Every kind of file a run writes is there to be searched.
    assert (run / "run.json").is_file() and any(run.rglob("*.parquet"))
    assert any(run.rglob("events.out.tfevents.*")) and any(run.rglob(checkpoint.STATE_FILE))
    assert files_holding(results, SECRET.encode()) == []  # the whole storage folder
    assert files_holding(wandb_dir / "wandb", SECRET.encode()) == []  # W&B's offline run
    # The records still name the server, masked.
    shown = redact(uri)
    assert SECRET not in shown and shown.startswith(f"http://{USER}:{MASK}@")
    assert json.loads((run / "run.json").read_text())["config"]["mlflow"] == shown
    assert step_metadata(run)["config"]["mlflow"] == shown
    state = checkpoint.load(checkpoint.latest_in_run(run))
    assert state["config"]["mlflow"] == shown


def test_wrong_mlflow_password_is_one_line_without_it(
    data_dir, mlflow_server, tmp_path, capfd, monkeypatch
):
    port, _ = mlflow_server
    uri = f"http://{USER}:{SECRET}-wrong@127.0.0.1:{port}"
    argv = ["--storage-path", str(tmp_path), "--name", "denied", "--mlflow", uri]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # Credentials from the URI alone; the ones the run moves into the environment go
    # with this test.
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    line = _cli_error([*argv, *tiny_flags()], capfd)
    assert line.startswith(f"error: --mlflow http://{USER}:{MASK}@127.0.0.1:{port}: ")
    assert "UNAUTHENTICATED" in line and "MLFLOW_TRACKING_PASSWORD" in line
    # Refused before the run folder was claimed: the same command with the right
    # password needs no --overwrite.
    assert list(tmp_path.iterdir()) == []


def test_the_mlflow_server_check_sends_the_credentials_mlflow_sends(mlflow_server, monkeypatch):
    port, _ = mlflow_server
    server = f"http://127.0.0.1:{port}"
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    trackers.check_mlflow_server(f"http://{USER}:{SECRET}@127.0.0.1:{port}")  # the URI's
    with pytest.raises(UserError, match="HTTP 401 UNAUTHENTICATED") as none:
        trackers.check_mlflow_server(server)
    assert str(none.value).startswith(f"--mlflow {server}: the server refused the credentials")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-hunter3")  # sent as a bearer token
    with pytest.raises(UserError, match="HTTP 401") as token:
        trackers.check_mlflow_server(server)
    assert "hunter3" not in str(token.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)  # the environment's, before a token
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    trackers.check_mlflow_server(server)
    # A URI with a user and an empty password: the run's client sends the environment's.
    trackers.check_mlflow_server(f"http://{USER}:@127.0.0.1:{port}")
    # A URI's own user:password goes instead of the environment's, as the run sends it.
    with pytest.raises(UserError, match="HTTP 401") as wrong:
        trackers.check_mlflow_server(f"http://{USER}:nope-{SECRET}@127.0.0.1:{port}")
    assert SECRET not in str(wrong.value) and f"{USER}:{MASK}@" in str(wrong.value)
    trackers.check_mlflow_server("file:///nowhere/mlruns")  # a file store: no server to ask


def test_the_mlflow_server_check_sends_no_credentials_where_a_redirect_points(monkeypatch):
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            if self.server is first:  # the server named: sends the client elsewhere
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{second.server_port}/x")
            else:
                self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    second = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    for server in (first, second):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    try:
        trackers.check_mlflow_server(f"http://{USER}:{SECRET}@127.0.0.1:{first.server_port}")
    finally:
        for server in (first, second):
            server.shutdown()
            server.server_close()
    # One request, to the server named, with the credentials; none followed the redirect.
    assert len(seen) == 1 and seen[0].startswith("Basic ")


def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by its own key: (cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_pem), str(key_pem)


def test_the_mlflow_server_check_over_https_honours_mlflow_s_tls_settings(tmp_path, monkeypatch):
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)  # the experiment is not made yet: the server let it in
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"https://{USER}:{SECRET}@127.0.0.1:{server.server_port}"
    tls = ("SERVER_CERT_PATH", "INSECURE_TLS", "CLIENT_CERT_PATH")
    for key_name in (f"MLFLOW_TRACKING_{name}" for name in tls):
        monkeypatch.delenv(key_name, raising=False)
    try:
        # A certificate nobody vouches for: refused, as MLflow's client would refuse it.
        with pytest.raises(UserError, match="CERTIFICATE_VERIFY_FAILED") as refused:
            trackers.check_mlflow_server(uri)
        assert "cannot reach the tracking server" in str(refused.value)
        assert SECRET not in str(refused.value)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", cert)  # the CA to trust
        trackers.check_mlflow_server(uri)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")  # no verification at all
        trackers.check_mlflow_server(uri)
        # A server that wants a client certificate: MLflow's one file of cert and key.
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cert)
        with pytest.raises(UserError, match="cannot reach the tracking server"):
            trackers.check_mlflow_server(uri)
        both = tmp_path / "client.pem"
        both.write_text(Path(cert).read_text() + Path(key).read_text())
        monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", str(both))
        trackers.check_mlflow_server(uri)
    finally:
        server.shutdown()
        server.server_close()
    # The refused handshakes sent nothing; the three accepted ones sent the credentials.
    assert len(seen) == 3 and all(a.startswith("Basic ") for a in seen)


def test_an_unreachable_mlflow_server_is_one_line_before_anything_is_written(
    data_dir, tmp_path, capfd
):
    uri = f"http://{USER}:{SECRET}@127.0.0.1:{free_port()}"
    argv = ["--storage-path", str(tmp_path), "--name", "unreached", "--mlflow", uri]
    started = time.monotonic()
    line = _cli_error([*argv, *tiny_flags()], capfd)
    assert time.monotonic() - started < trackers.MLFLOW_CHECK_TIMEOUT_S
    assert line.startswith(f"error: --mlflow http://{USER}:{MASK}@127.0.0.1:")
    assert "cannot reach the tracking server" in line and "Connection refused" in line
    assert list(tmp_path.iterdir()) == []
