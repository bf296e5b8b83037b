"""`python -m raygpt.cluster validate FILE.yaml [...]`: check `ray up` configs offline.

A typo in a cluster config otherwise shows up minutes into `ray up`, after
instances have started billing. This runs the same checks `ray up` runs before
it talks to the cloud, and nothing else:

* `prepare_config` fills in the provider's defaults (read from YAML files that
  ship with Ray), merges setup commands and sets per-node-type worker limits;
  for `provider: local` it also turns head_ip/worker_ips into a node type.
* `validate_config` checks the result against Ray's JSON schema
  (`ray/autoscaler/ray-schema.json`) and the cross-field rules (head_node_type
  must be a node type, min_workers must fit under max_workers).
* For EC2 `NetworkInterfaces` (the EFA interfaces of GPU nodes), the rules that
  `bootstrap_config` applies before its first AWS call, plus EC2's one interface
  per network card and device index; a warning when several interfaces (hence
  no public IP) meet a provider without `use_internal_ips`.

None of this imports a cloud SDK, opens a socket or reads credentials. What `ray up`
does next is left out on purpose because it does: asking EC2 for instance
resources (`fillout_available_node_types_resources`) and creating or looking up
key pairs, IAM roles, subnets and security groups (`bootstrap_config`). So a
wrong AMI ID, subnet, region or instance type passes here and fails at `ray up`.

`ray.autoscaler._private.util` is private API; pyproject pins Ray to 2.60.x.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from raygpt.config.io import OneLineArgumentParser
from raygpt.errors import ANSI, UserError, exit_on_user_error, first_line

# `--dashboard-host=0.0.0.0`, `--dashboard-host 0.0.0.0`, `--dashboard-host='::'`.
_PUBLIC_DASHBOARD = re.compile(r"--dashboard-host(?:=|\s+)['\"]?(0\.0\.0\.0|::)(?![\w.:])")


def validate(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Ray's offline checks on one cluster config; return it with Ray's defaults filled in.

    Raises UserError (naming the file) if it cannot be read, is not YAML, or Ray
    rejects it. Warnings (Ray's own, and a dashboard bound to every interface)
    are printed to stderr as `warning: FILE: ...`.
    """
    name = str(path)
    raw = _load_yaml(name)

    from ray.autoscaler._private.util import prepare_config, validate_config

    with _captured_ray_output() as ray_warnings:
        try:
            prepared = prepare_config(copy.deepcopy(raw))
        except Exception as err:  # Ray signals bad input with many exception types
            prepare_error = err
        else:
            prepare_error = None
    if prepare_error is not None:
        # prepare_config assumes a well-typed config: a list where a mapping belongs
        # makes it crash with a TypeError that names nothing, so ask the schema first.
        _check_schema_before_defaults(name, raw)
        raise UserError(f"{name}: {_what_failed(prepare_error)}") from None
    for message in ray_warnings:
        _warn(name, message)

    try:
        validate_config(prepared)
    except ImportError:
        raise UserError(
            f"{name}: Ray's config validator needs jsonschema; "
            'install ray[default] (pip install "ray[default]")'
        ) from None
    except Exception as err:  # jsonschema.ValidationError, ValueError, RuntimeError
        raise UserError(f"{name}: {_describe(err)}") from None

    _check_dashboard_host(name, raw, prepared)
    _check_network_interfaces(name, prepared)
    return prepared


def _load_yaml(name: str) -> dict[str, Any]:
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a directory, expected a cluster config YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{name}: cannot read it ({_what_failed(err)})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        where = ""
        if err.problem_mark is not None:
            where = f" at line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}"
        problem = err.problem or _what_failed(err)
        raise UserError(f"{name}: not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{name}: not valid YAML: {_what_failed(err)}") from None
    if not isinstance(config, dict):
        got = "an empty file" if config is None else f"a {type(config).__name__}"
        raise UserError(f"{name}: expected a Ray cluster config (a YAML mapping), got {got}")
    return config


@contextlib.contextmanager
def _captured_ray_output() -> Iterator[list[str]]:
    """Collect the warnings Ray's cli_logger gives while preparing a config; mute the rest.

    cli_logger prints straight to stdout (its warnings included) with a format
    that depends on whether stdin is a tty, so its `warning` method is swapped
    for a collector instead of parsing what it prints. Ray's INFO logging
    ("setting max workers for ...") is silenced.
    """
    from ray.autoscaler._private import cli_logger as cli

    def collect(msg: str, *args: Any, **kwargs: Any) -> None:
        text = ANSI.sub("", cli._format_msg(msg, *args, **kwargs)).strip()
        if text:
            warnings.append(text)

    warnings: list[str] = []
    ray_logger = logging.getLogger("ray.autoscaler")
    level = ray_logger.level
    ray_logger.setLevel(logging.WARNING)
    try:
        with (
            mock.patch.object(cli.cli_logger, "warning", collect),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            yield warnings
    finally:
        ray_logger.setLevel(level)


def _check_schema_before_defaults(name: str, raw: dict[str, Any]) -> None:
    """Raise the schema's complaint about `raw` as it stands, if it has one.

    Two relaxations match what prepare_config accepts: cluster_name gets a
    default, and a top-level min_workers (legacy; on-prem configs use it) is
    moved into the node types.
    """
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    schema["required"] = [key for key in schema.get("required", []) if key != "cluster_name"]
    schema["properties"]["min_workers"] = {"type": "integer", "minimum": 0}
    try:
        jsonschema.validate(raw, schema)
    except jsonschema.ValidationError as err:
        raise UserError(f"{name}: {_describe(err)}") from None


def _describe(err: BaseException) -> str:
    """One line: where in the config (for schema errors), what is wrong, a hint."""
    import jsonschema

    if not isinstance(err, jsonschema.ValidationError):
        return _what_failed(err)
    message = err.message
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        extra = [key for key in err.instance if key not in known]
        close = [difflib.get_close_matches(str(key), known, n=1) for key in extra]
        hints = [
            f"{key!r} -> {match[0]!r}" for key, match in zip(extra, close, strict=True) if match
        ]
        if hints:
            message += f"; did you mean {', '.join(hints)}?"
    where = _json_path(list(err.absolute_path))
    return f"{where}: {message}" if where else message


def _json_path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _check_dashboard_host(name: str, raw: dict[str, Any], prepared: dict[str, Any]) -> None:
    """Warn when Ray's dashboard would listen on every interface.

    The dashboard accepts job submissions, i.e. runs arbitrary code, without
    authentication; the shipped configs keep it on 127.0.0.1 and reach it
    through `ray dashboard FILE` (an ssh tunnel).
    """
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in prepared.get(key) or []:
            match = _PUBLIC_DASHBOARD.search(str(command))
            if match is None:
                continue
            source = key if key in raw else f"{key} (Ray's default for this provider)"
            _warn(
                name,
                f"{source} binds the dashboard to {match.group(1)}, so anyone who can "
                "reach the node can submit jobs; use --dashboard-host=127.0.0.1 and "
                f"`ray dashboard {name}`",
            )
            break


def _check_network_interfaces(name: str, prepared: dict[str, Any]) -> None:
    """EC2 `NetworkInterfaces` in a node config, as `ray up` and EC2 will judge them.

    Ray's AWS bootstrap (`_configure_subnets_and_groups_from_network_interfaces`)
    takes subnets and security groups from the interfaces only: every interface
    needs SubnetId and Groups, and the node config may not also give SubnetId(s) or
    SecurityGroupIds. EC2 refuses two interfaces on one network card and device
    index. And an instance launched with several interfaces gets no public IPv4
    address, so its subnet must be private (with a NAT gateway for setup's
    downloads), which Ray accepts only with provider.use_internal_ips.
    """
    provider = prepared.get("provider") or {}
    if provider.get("type") != "aws":
        return
    for key, node_type in (prepared.get("available_node_types") or {}).items():
        node_config = node_type.get("node_config") or {}
        if "NetworkInterfaces" not in node_config:
            continue
        where = f"available_node_types.{key}.node_config"
        interfaces = node_config["NetworkInterfaces"]
        if not isinstance(interfaces, list) or not all(isinstance(i, dict) for i in interfaces):
            raise UserError(f"{name}: {where}.NetworkInterfaces: expected a list of mappings")
        clash = [k for k in ("SubnetId", "SubnetIds", "SecurityGroupIds") if k in node_config]
        if clash:
            raise UserError(
                f"{name}: {where}: {' and '.join(clash)} beside NetworkInterfaces; `ray up` "
                "takes subnets and security groups only from each interface (SubnetId, Groups)"
            )
        taken: dict[tuple[Any, Any], int] = {}
        for i, interface in enumerate(interfaces):
            missing = [k for k in ("SubnetId", "Groups") if not interface.get(k)]
            if missing:
                raise UserError(
                    f"{name}: {where}.NetworkInterfaces[{i}]: no {' or '.join(missing)}; "
                    "`ray up` needs SubnetId and Groups on every interface"
                )
            slot = (interface.get("NetworkCardIndex", 0), interface.get("DeviceIndex"))
            if slot in taken:
                raise UserError(
                    f"{name}: {where}.NetworkInterfaces[{i}]: NetworkCardIndex {slot[0]}, "
                    f"DeviceIndex {slot[1]} is already NetworkInterfaces[{taken[slot]}]'s; "
                    "EC2 takes one interface per network card and device index"
                )
            taken[slot] = i
        if len(interfaces) > 1 and not provider.get("use_internal_ips"):
            _warn(
                name,
                f"{where} has {len(interfaces)} network interfaces, and EC2 gives such an "
                "instance no public IP: put them on a private subnet with a NAT gateway and "
                "set provider.use_internal_ips: true (and use_external_head_ip: true to "
                "keep ssh to the head's public IP)",
            )


def _warn(name: str, message: str) -> None:
    print(f"warning: {name}: {message}", file=sys.stderr, flush=True)


def _what_failed(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return f"missing key {err.args[0]!r}"
    return first_line(err)


def summary(config: dict[str, Any]) -> str:
    node_types = config.get("available_node_types") or {}
    return f"{len(node_types)} node types, max workers {config.get('max_workers')}"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.cluster",
        description="Check Ray cluster configs (for `ray up`) offline, with Ray's own validator.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "validate",
        help="validate cluster config YAML files; stops at the first invalid one",
        description="Validate cluster config YAML files; stops at the first invalid one.",
    )
    check.add_argument(
        "files", nargs="+", metavar="FILE", help="cluster config, e.g. cluster/a100.yaml"
    )
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.files:
        config = validate(name)
        print(f"ok: {name} ({summary(config)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
