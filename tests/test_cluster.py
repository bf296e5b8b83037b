"""The shipped `ray up` configs pass Ray's own validator, offline; bad ones fail in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raygpt import cluster
from raygpt.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "cluster").glob("*.y*ml"))


def write_variant(tmp_path: Path, edit, name: str = "variant.yaml") -> Path:
    """cluster/a100.yaml with `edit(config)` applied, written to tmp_path."""
    config = yaml.safe_load((REPO / "cluster" / "a100.yaml").read_text())
    edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_expected_configs_ship():
    assert {p.name for p in SHIPPED} >= {"a100.yaml", "h100.yaml", "local.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates_without_warnings(path, capsys):
    config = cluster.validate(path)
    assert config["available_node_types"][config["head_node_type"]]
    assert config["max_workers"] >= 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,gpu_type", [("a100.yaml", "gpu_a100"), ("h100.yaml", "gpu_h100")])
def test_aws_configs_have_an_8_gpu_worker_type_and_a_cpu_only_head(name, gpu_type):
    config = cluster.validate(REPO / "cluster" / name)
    assert config["available_node_types"][gpu_type]["resources"]["GPU"] == 8
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start


def test_validation_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during validation: {args[1:]!r}")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("getaddrinfo", "gethostbyname", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    for path in SHIPPED:
        cluster.validate(path)


def test_bad_indentation_names_the_file_and_line(tmp_path):
    path = tmp_path / "indent.yaml"
    path.write_text("cluster_name: x\nprovider:\n  type: aws\n region: us-east-1\n")
    with pytest.raises(UserError, match=r"indent\.yaml: not valid YAML: .* line 4"):
        cluster.validate(path)


def test_wrong_type_names_the_key(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(max_workers="lots"))
    with pytest.raises(UserError) as err:
        cluster.validate(path)
    assert str(err.value) == f"{path}: max_workers: 'lots' is not of type 'integer'"


def test_unknown_top_level_key_is_named_with_a_suggestion(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(max_wrokers=3))
    with pytest.raises(
        UserError, match=r"'max_wrokers' was unexpected.*did you mean.*'max_workers'"
    ):
        cluster.validate(path)


def test_nested_schema_error_gives_the_path(tmp_path):
    def edit(config):
        config["available_node_types"]["gpu_a100"]["resources"]["GPU"] = "eight"

    path = write_variant(tmp_path, edit)
    with pytest.raises(UserError, match=r"available_node_types\.gpu_a100\.resources\.GPU: 'eight'"):
        cluster.validate(path)


def test_wrong_type_that_crashes_ray_defaults_is_still_named(tmp_path):
    # prepare_config concatenates setup_commands lists: a string there is a TypeError.
    path = write_variant(tmp_path, lambda c: c.update(setup_commands="pip install -e ."))
    with pytest.raises(UserError, match=r"setup_commands: 'pip install -e \.' is not of type"):
        cluster.validate(path)


def test_cross_field_rule(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(head_node_type="nope"))
    with pytest.raises(UserError, match="head_node_type` must be one of `available_node_types"):
        cluster.validate(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.yaml: no such file"):
        cluster.validate(tmp_path / "nowhere.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty\.yaml: expected a Ray cluster config"):
        cluster.validate(empty)


def test_public_dashboard_warns_but_validates(tmp_path, capsys):
    def edit(config):
        config["head_start_ray_commands"] = [
            cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for cmd in config["head_start_ray_commands"]
        ]

    cluster.validate(write_variant(tmp_path, edit))
    err = capsys.readouterr().err
    assert (
        err.startswith("warning: ")
        and "head_start_ray_commands binds the dashboard to 0.0.0.0" in err
    )

    # Left out, the start commands come from Ray's AWS defaults, which bind 0.0.0.0.
    cluster.validate(write_variant(tmp_path, lambda c: c.pop("head_start_ray_commands")))
    assert "Ray's default for this provider" in capsys.readouterr().err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raygpt.cluster", "validate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_accepts_the_shipped_configs():
    result = run_cli(*(str(p.relative_to(REPO)) for p in SHIPPED))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(SHIPPED)
    assert "ok: cluster/a100.yaml (2 node types, max workers 2)" in lines
    assert result.stderr == ""


def test_cli_stops_at_the_first_invalid_file_with_one_error_line(tmp_path):
    bad = write_variant(tmp_path, lambda c: c.update(max_workers="lots"), name="bad.yaml")
    result = run_cli("cluster/a100.yaml", str(bad), "cluster/h100.yaml")
    assert result.returncode == 2
    assert result.stdout.splitlines() == ["ok: cluster/a100.yaml (2 node types, max workers 2)"]
    assert result.stderr.splitlines() == [
        f"error: {bad}: max_workers: 'lots' is not of type 'integer'"
    ]
