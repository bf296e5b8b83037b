"""The shipped `ray up` configs pass Ray's own validator, offline; bad ones fail in one line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from raygpt.cluster import ray_up
from raygpt.errors import UserError

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
    config = ray_up.validate(path)
    assert config["available_node_types"][config["head_node_type"]]
    assert config["max_workers"] >= 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,gpu_type", [("a100.yaml", "gpu_a100"), ("h100.yaml", "gpu_h100")])
def test_aws_configs_have_an_8_gpu_worker_type_and_a_cpu_only_head(name, gpu_type):
    config = ray_up.validate(REPO / "cluster" / name)
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
        ray_up.validate(path)


def test_bad_indentation_names_the_file_and_line(tmp_path):
    path = tmp_path / "indent.yaml"
    path.write_text("cluster_name: x\nprovider:\n  type: aws\n region: us-east-1\n")
    with pytest.raises(UserError, match=r"indent\.yaml: not valid YAML: .* line 4"):
        ray_up.validate(path)


def test_wrong_type_names_the_key(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(max_workers="lots"))
    with pytest.raises(UserError) as err:
        ray_up.validate(path)
    assert str(err.value) == f"{path}: max_workers: 'lots' is not of type 'integer'"


def test_unknown_top_level_key_is_named_with_a_suggestion(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(max_wrokers=3))
    with pytest.raises(
        UserError, match=r"'max_wrokers' was unexpected.*did you mean.*'max_workers'"
    ):
        ray_up.validate(path)


def test_nested_schema_error_gives_the_path(tmp_path):
    def edit(config):
        config["available_node_types"]["gpu_a100"]["resources"]["GPU"] = "eight"

    path = write_variant(tmp_path, edit)
    with pytest.raises(UserError, match=r"available_node_types\.gpu_a100\.resources\.GPU: 'eight'"):
        ray_up.validate(path)


def test_wrong_type_that_crashes_ray_defaults_is_still_named(tmp_path):
    # prepare_config concatenates setup_commands lists: a string there is a TypeError.
    path = write_variant(tmp_path, lambda c: c.update(setup_commands="pip install -e ."))
    with pytest.raises(UserError, match=r"setup_commands: 'pip install -e \.' is not of type"):
        ray_up.validate(path)


def test_cross_field_rule(tmp_path):
    path = write_variant(tmp_path, lambda c: c.update(head_node_type="nope"))
    with pytest.raises(UserError, match="head_node_type` must be one of `available_node_types"):
        ray_up.validate(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.yaml: no such file"):
        ray_up.validate(tmp_path / "nowhere.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty\.yaml: expected a Ray cluster config"):
        ray_up.validate(empty)


def test_public_dashboard_warns_but_validates(tmp_path, capsys):
    def edit(config):
        config["head_start_ray_commands"] = [
            cmd.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")
            for cmd in config["head_start_ray_commands"]
        ]

    ray_up.validate(write_variant(tmp_path, edit))
    err = capsys.readouterr().err
    assert (
        err.startswith("warning: ")
        and "head_start_ray_commands binds the dashboard to 0.0.0.0" in err
    )

    # Left out, the start commands come from Ray's AWS defaults, which bind 0.0.0.0.
    ray_up.validate(write_variant(tmp_path, lambda c: c.pop("head_start_ray_commands")))
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


# --- what the shipped configs promise: shared storage, instance profiles, NCCL over EFA

AWS = {"a100.yaml": "gpu_a100", "h100.yaml": "gpu_h100"}
# One EFA interface per network card: EC2's NetworkInfo.EfaInfo.MaximumEfaInterfaces.
EFA_INTERFACES = {"p4d.24xlarge": 4, "p5.48xlarge": 32}
STORAGE = re.compile(r"RAYGPT_STORAGE_PATH=([^'\"\s;]+)")
HEAD_IP = "10.0.0.1"


def strings(value):
    """Every string in a parsed YAML value, keys excluded."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def node_commands(config: dict) -> dict[str, tuple[list[str], list[str]]]:
    """{node type: (its setup commands, its ray start commands)}, as `ray up` runs them.

    The head runs setup_commands + head_setup_commands; a worker type runs its own
    worker_setup_commands if it has some, else setup_commands + worker_setup_commands.
    """
    nodes = {}
    for key, node_type in config["available_node_types"].items():
        if key == config["head_node_type"]:
            nodes[key] = (config["head_setup_commands"], config["head_start_ray_commands"])
        else:
            setup = node_type.get("worker_setup_commands", config["worker_setup_commands"])
            nodes[key] = (setup, config["worker_start_ray_commands"])
    return nodes


def ray_start_environment(tmp_path: Path, setup: list[str], start: list[str]) -> dict[str, str]:
    """The environment `ray start` gets on a node, found by running the node's commands.

    A fresh HOME stands in for the node. Of its setup commands only those that touch
    ~/raygpt.env run (the others install software); then the start command runs with
    a stand-in `~/venv/bin/ray` that prints its environment, and a stand-in `ip` that
    answers `ip -o route get HEAD_IP` as a p4d node would.
    """
    home = tmp_path / "home"
    bin_dir = tmp_path / "bin"
    (home / "venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    fake_ray = home / "venv" / "bin" / "ray"
    fake_ray.write_text('#!/bin/sh\nenv > "$HOME/ray-start.env"\n')
    fake_ip = bin_dir / "ip"
    fake_ip.write_text(
        "#!/bin/sh\n"
        f'[ "$*" = "-o route get {HEAD_IP}" ] && dev=ens32 || dev=wrong0\n'
        'echo "$4 via 10.0.2.1 dev $dev src 10.0.2.44 uid 1000 \\\\    cache"\n'
    )
    for script in (fake_ray, fake_ip):
        script.chmod(0o755)
    env = {
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "LD_LIBRARY_PATH": "/already/there",
    }
    (start_ray,) = [c for c in start if "ray start" in c]
    # `ray up` exports the head's address to start commands in the same way.
    commands = [c for c in setup if "raygpt.env" in c]
    commands.append(f"export RAY_HEAD_IP={HEAD_IP}; {start_ray}")
    for command in commands:
        subprocess.run(["bash", "-c", command], env=env, check=True, capture_output=True)
    lines = (home / "ray-start.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_storage_path_is_named_in_exactly_one_place(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    named = [s for s in strings(config) if "RAYGPT_STORAGE_PATH=" in s]
    assert len(named) == 1, named
    assert named[0] in config["setup_commands"]  # which every node runs
    (storage,) = STORAGE.findall(named[0])
    assert text.count(storage) == 1  # not repeated in a comment either
    if path.name in AWS:
        assert storage.startswith("s3://")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_node_exports_the_storage_path_before_ray_start(path, tmp_path):
    config = ray_up.validate(path)
    (storage,) = {m for s in strings(config) for m in STORAGE.findall(s)}
    for key, (setup, start) in node_commands(config).items():
        env = ray_start_environment(tmp_path / key, setup, start)
        assert env.get("RAYGPT_STORAGE_PATH") == storage, key


@pytest.mark.parametrize("name", AWS)
def test_nccl_reaches_ray_start_on_gpu_workers_with_efa_settings(name, tmp_path):
    config = ray_up.validate(REPO / "cluster" / name)
    setup, start = node_commands(config)[AWS[name]]
    env = ray_start_environment(tmp_path, setup, start)
    assert env["FI_PROVIDER"] == "efa"
    assert env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_DEBUG"] == "WARN"
    # The interface this node reaches the head through, as `ip route get` says.
    assert env["NCCL_SOCKET_IFNAME"] == "ens32"
    paths = env["LD_LIBRARY_PATH"].split(":")
    assert {"/opt/amazon/efa/lib", "/opt/amazon/ofi-nccl/lib"} <= set(paths)
    assert paths[-1] == "/already/there"


@pytest.mark.parametrize("name", AWS)
def test_gpu_workers_have_an_instance_profile_and_an_efa_interface_per_network_card(name):
    config = ray_up.validate(REPO / "cluster" / name)
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    gpu = config["available_node_types"][AWS[name]]["node_config"]
    assert gpu["IamInstanceProfile"].get("Name") or gpu["IamInstanceProfile"].get("Arn")

    count = EFA_INTERFACES[gpu["InstanceType"]]
    interfaces = gpu["NetworkInterfaces"]
    assert [i["InterfaceType"] in ("efa", "efa-only") for i in interfaces] == [True] * count
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(count))
    # The primary interface carries the node's IP address, so it cannot be EFA-only.
    assert interfaces[0]["InterfaceType"] == "efa"
    assert (interfaces[0]["NetworkCardIndex"], interfaces[0]["DeviceIndex"]) == (0, 0)
    assert all(i["DeleteOnTermination"] is True for i in interfaces)
    # EFA stays within one subnet, and every node shares the head's security group.
    assert len({i["SubnetId"] for i in interfaces}) == 1
    assert all(i["Groups"] == head["SecurityGroupIds"] for i in interfaces)
    # Several interfaces mean no public IP: a private subnet, reached by private IP.
    assert config["provider"]["use_internal_ips"] is True
    assert config["provider"]["use_external_head_ip"] is True
    assert head["SubnetIds"]

    # Setup refuses a node on which fewer EFA devices showed up.
    (check,) = [c for c in config["worker_setup_commands"] if "/sys/class/infiniband" in c]
    assert re.search(r"-eq (\d+)\b", check).group(1) == str(count)


def with_interfaces(edit):
    def apply(config):
        edit(config["available_node_types"]["gpu_a100"]["node_config"])

    return apply


def test_an_interface_without_groups_is_named(tmp_path):
    path = write_variant(
        tmp_path, with_interfaces(lambda c: c["NetworkInterfaces"][2].pop("Groups"))
    )
    with pytest.raises(UserError) as err:
        ray_up.validate(path)
    assert str(err.value) == (
        f"{path}: available_node_types.gpu_a100.node_config.NetworkInterfaces[2]: no Groups; "
        "`ray up` needs SubnetId and Groups on every interface"
    )


def test_subnets_beside_network_interfaces_are_refused(tmp_path):
    path = write_variant(tmp_path, with_interfaces(lambda c: c.update(SubnetIds=["subnet-1"])))
    with pytest.raises(UserError, match=r"gpu_a100\.node_config: SubnetIds beside NetworkInterf"):
        ray_up.validate(path)


def test_two_interfaces_on_one_card_and_device_are_refused(tmp_path):
    path = write_variant(
        tmp_path, with_interfaces(lambda c: c["NetworkInterfaces"][3].update(NetworkCardIndex=2))
    )
    with pytest.raises(
        UserError, match=r"NetworkInterfaces\[3\]: NetworkCardIndex 2, DeviceIndex 1 is already"
    ):
        ray_up.validate(path)


def test_several_interfaces_without_internal_ips_warn(tmp_path, capsys):
    path = write_variant(tmp_path, lambda c: c["provider"].pop("use_internal_ips"))
    ray_up.validate(path)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path}: available_node_types.gpu_a100.node_config has 4 ")
    assert "provider.use_internal_ips: true" in err
