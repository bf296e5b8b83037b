"""The plan of a learning-rate transfer: its proxy sizes and its target, checked.

Each `--transfer KEY=a,b,c` axis varies one model size key over its values with the
other keys at the base config's, so two axes of 3 give up to 6 sizes, the base point
shared; `--target KEY=N,...` names the model the transfer predicts for (a key it leaves
out stays at the base's). The sweep's config checks a plan here before Ray starts:
every refusal is one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from raygpt.errors import UserError
from raygpt.report.transfer.fit import num
from raygpt.report.transfer.trend import check_target

SIZE_KEYS = ("n_embd", "n_layer", "n_head")
PROXIES_DIR = "proxies"
CONFIRM_DIR = "confirm-target"
CONFIRM_MULTIPLES = (0.5, 1.0, 2.0)  # of the predicted lr, trained at the target


# --------------------------------------------------------------------------- the plan


def parse_axis(spec: str) -> tuple[str, list[int]]:
    """--transfer n_embd=64,128,256 as ("n_embd", [64, 128, 256])."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not values.strip():
        raise UserError(f"--transfer {spec!r} is not KEY=a,b,c (for example n_embd=64,128,256)")
    if key not in SIZE_KEYS:
        raise UserError(
            f"--transfer {spec!r}: {key!r} is not a model size key; vary one of "
            f"{', '.join(SIZE_KEYS)}"
        )
    out = [_size_value(f"--transfer {spec!r}", key, v) for v in values.split(",") if v.strip()]
    if len(set(out)) < 2:
        raise UserError(
            f"--transfer {spec!r} gives {len(set(out))} size; a trend needs at least 2 "
            f"values of {key}"
        )
    if len(set(out)) != len(out):
        raise UserError(f"--transfer {spec!r} repeats a value")
    return key, sorted(out)


def parse_target(text: str) -> dict[str, int]:
    """--target n_embd=768,n_layer=12 as {"n_embd": 768, "n_layer": 12}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(
                f"--target {text!r} is not KEY=N,... (for example n_embd=768,n_layer=12)"
            )
        if key not in SIZE_KEYS:
            raise UserError(
                f"--target {text!r}: {key!r} is not a model size key; give {', '.join(SIZE_KEYS)}"
            )
        if key in out:
            raise UserError(f"--target {text!r} names {key} twice")
        out[key] = _size_value(f"--target {text!r}", key, value)
    if not out:
        raise UserError(f"--target {text!r} names no size (for example n_embd=768,n_layer=12)")
    return out


def _size_value(where: str, key: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{where}: {key}={text.strip()!r} must be a positive whole number")
    return value


def size_text(size: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """n_embd=768, n_layer=12 (the keys given, default every key of the size)."""
    return ", ".join(f"{k}={num(size[k])}" for k in (keys or size))


def proxy_sizes(
    base: Mapping[str, Any], axes: Sequence[tuple[str, Sequence[int]]]
) -> list[tuple[str, dict[str, int]]]:
    """(folder name, full size) of each proxy: each axis's values with the other size
    keys at the base's; a size two axes share (the base point) once. A folder is named
    by the axes' keys: n_embd=64, or n_embd=64,n_layer=2 with two axes."""
    keys = [key for key, _ in axes]
    start = {k: int(base[k]) for k in SIZE_KEYS}
    out: dict[str, dict[str, int]] = {}
    for key, values in axes:
        for value in values:
            size = start | {key: int(value)}
            out.setdefault(",".join(f"{k}={size[k]}" for k in keys), size)
    return list(out.items())


def target_size(
    base: Mapping[str, Any], axes: Sequence[tuple[str, Sequence[int]]], target: Mapping[str, int]
) -> dict[str, int]:
    """The target over the axes' keys and its own: a key it leaves out stays at the base's
    (--transfer n_embd=... --target n_layer=12 predicts for the base width at 12 layers)."""
    keys = dict.fromkeys([*(k for k, _ in axes), *target])
    return {k: int(target[k]) if k in target else int(base[k]) for k in keys}


def check_plan(
    base: Mapping[str, Any], axes: Sequence[tuple[str, Sequence[int]]], target: Mapping[str, int]
) -> list[tuple[str, dict[str, int]]]:
    """The proxies of a plan, or a one-line UserError: an axis given twice, a width the
    heads do not divide, a target smaller than the proxies (lr_trend.check_target)."""
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--transfer varies {keys[0]} twice; give each key once, as KEY=a,b,c")
    sizes = proxy_sizes(base, axes)
    full_target = {k: int(base[k]) for k in SIZE_KEYS} | dict(target)
    for where, size in [
        *((f"proxy {n} of --transfer", s) for n, s in sizes),
        ("--target", full_target),
    ]:
        if size["n_embd"] % size["n_head"]:
            raise UserError(
                f"{where}: n_embd={size['n_embd']} is not divisible by n_head={size['n_head']}; "
                "attention splits n_embd evenly across heads: choose widths that are "
                "multiples of n_head"
            )
    check_target([s for _, s in sizes], target)
    return sizes
