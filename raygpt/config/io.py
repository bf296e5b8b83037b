"""Config as data: a TOML file and flags read into a typed dataclass, one `--kebab-case`
flag per field, every value checked against its field's type.

Defaults < TOML file < flags. An unknown key or flag, or a value of the wrong type, is
one line naming it (and, where one is close, the key that was meant).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from raygpt.errors import UserError


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Convert a TOML value or flag string to the field's type, or say why not."""
    base, optional = unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} in {source} must be a list, got {value!r}")
        return [coerce(key, v, item_tp, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} in {source} must be a table, got {value!r}")
        return dict(value)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                number = float(value)
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if isinstance(value, int):
                return value
            raise ValueError
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    kind = {bool: "true or false", int: "an integer", float: "a finite number"}.get(base, "text")
    raise UserError(f"{key}={value!r} in {source} is not {kind}")


def _unknown_key(key: str, known: list[str], source: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see --help for the known keys"
    return UserError(f"unknown config key {key!r} in {source}{hint}")


def build_dataclass(cls: type, values: dict[str, Any], source: str) -> Any:
    """Instantiate `cls` from a mapping, rejecting unknown keys and coercing types."""
    types_by_name = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_name:
            raise _unknown_key(key, sorted(types_by_name), source)
        kwargs[key] = coerce(key, value, types_by_name[key], source)
    return cls(**kwargs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse an experiment file; a missing or malformed file is one clear line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"experiment file {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"experiment file {path} is not UTF-8 text") from None


# --------------------------------------------------------------------------- flags


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line) instead of usage + exit."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Python 3.11's argparse takes `--learning-rate -1e-3` for a flag with no value
        # (its pattern misses exponents); treat any negative number as a value.
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help"
            raise UserError(f"unknown flag {flag}{hint}")
        raise UserError(f"{message}; see --help")


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    exclude: tuple[str, ...] = (),
    title: str | None = None,
    help_texts: dict[str, str] | None = None,
) -> None:
    """One `--kebab-case` flag per field; absent flags stay absent (no defaults here).
    `help_texts`: what a key's --help says besides its default."""
    group = parser.add_argument_group(title or f"{cls.__name__} keys")
    types_by_name = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        # A bare boolean flag (--resume) means true; --resume false is also accepted.
        is_bool = unwrap_optional(types_by_name[f.name])[0] is bool
        group.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            nargs="?" if is_bool else None,
            const="true" if is_bool else None,
            help=" ".join(filter(None, ((help_texts or {}).get(f.name), f"(default: {default})"))),
        )


def merge(cls: type, file_values: dict[str, Any], flag_values: dict[str, Any], source: str) -> Any:
    """Defaults < TOML file < flags, each key type-checked against `cls`."""
    instance = build_dataclass(cls, file_values, source)
    types_by_name = field_types(cls)
    for key, value in flag_values.items():
        setattr(instance, key, coerce(key, value, types_by_name[key], f"flag {flag_name(key)}"))
    return instance
