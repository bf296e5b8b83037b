"""`python -m raygpt.mup coord-check EXP.toml --widths 64,128,256,512,1024`: the
coordinate check of a parametrization (coord_check.py) on your own model.

    python -m raygpt.mup coord-check experiments/pydocs_char_cpu.toml --parametrization mup
    python -m raygpt.mup coord-check experiments/pydocs_char_cpu.toml \\
        --parametrization completep --depths 2,4,8,16 --learning-rate 1e-2

It trains the experiment's model at each width (n_embd; n_head as the experiment has it)
and each depth (n_layer, at the experiment's n_embd) for --steps updates in this process
(no Ray, CPU unless --device), then writes coord_check.png and coord_check.parquet (and
.csv) to --out and prints one line per layer type: the slope of log RMS against log
size and whether it is what the parametrization promises (flat under mup and completep;
sp's logits grow with width). The sequences are --block-size x --batch-size tokens, small
by default so that the whole check takes seconds; every other key is the experiment's,
overridable by its flag. It exits 1 when a promised line fails.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from raygpt.config.choices import LR_SCHEDULE_KEYS, OBSERVATION_KEYS, PLACEMENT_KEYS
from raygpt.config.io import OneLineArgumentParser
from raygpt.config.train import add_train_flags, load_train_config
from raygpt.errors import UserError, exit_on_user_error
from raygpt.mup import coord_check

# Keys of a run rather than of the model and its optimizer, and those the check sets
# itself (batch and sequence below; the learning rate is held constant).
NOT_FLAGS = (
    "name",
    *PLACEMENT_KEYS,
    "resume",
    "overwrite",
    "init_from",
    *LR_SCHEDULE_KEYS,
    "batch_size",
    "block_size",
    "tokens_per_step",
    *OBSERVATION_KEYS,
    "eval_only",
    "dtype",
    "compile",
    "peak_tflops",
)
CHECK_KEYS = (
    "command",
    "experiment",
    "widths",
    "depths",
    "steps",
    "seeds",
    "tolerance",
    "out",
    "device",
    "batch_size",
    "block_size",
)
DEFAULT_WIDTHS = "64,128,256,512"
DEFAULT_BATCH, DEFAULT_BLOCK = 8, 32


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a list of integers, e.g. 64,128,256") from None
    return sizes


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m raygpt.mup",
        description="muP tools: the coordinate check of a parametrization.",
    )
    commands = p.add_subparsers(
        dest="command", metavar="{coord-check}", parser_class=OneLineArgumentParser
    )
    commands.required = True
    c = commands.add_parser(
        "coord-check",
        help="activation RMS against width (and depth) after a few steps, with a verdict",
        description="Train the experiment's model a few steps at each width (and depth) "
        "and check that each layer type's activation RMS stays flat (mup, completep) or "
        "grows as sp's does.",
    )
    c.add_argument("experiment", nargs="?", help="experiment TOML file (its model and optimizer)")
    check = c.add_argument_group("coordinate check")
    check.add_argument(
        "--widths",
        default=None,
        help=f"n_embd values (default {DEFAULT_WIDTHS}, or none when --depths is given)",
    )
    check.add_argument(
        "--depths", default="", help="n_layer values, at the experiment's n_embd (default none)"
    )
    check.add_argument(
        "--steps",
        type=int,
        default=coord_check.DEFAULT_STEPS,
        help=f"updates per size; the verdict reads the last (default {coord_check.DEFAULT_STEPS})",
    )
    check.add_argument("--seeds", type=int, default=1, help="seeds averaged per size (default 1)")
    check.add_argument(
        "--tolerance",
        type=float,
        default=coord_check.DEFAULT_TOLERANCE,
        help="largest |slope| that counts as flat, and the least sp's logits must grow by "
        f"(default {coord_check.DEFAULT_TOLERANCE})",
    )
    check.add_argument(
        "--out", default=None, help="folder for the PNG and the table (default coord_check_PARAM)"
    )
    check.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1")
    check.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"sequences per step ({DEFAULT_BATCH})",
    )
    check.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK, help=f"sequence length ({DEFAULT_BLOCK})"
    )
    add_train_flags(c, exclude=NOT_FLAGS, title="config keys (TOML key = flag)")
    return p


def check(argv: list[str] | None = None, log: Any = print) -> tuple[int, list]:
    """Run the check as the command line says; (exit code, verdicts)."""
    args = vars(build_parser().parse_args(argv))
    opts = {key: args.pop(key) for key in CHECK_KEYS}
    depths = _sizes(opts["depths"], "--depths")
    default_widths = "" if depths else DEFAULT_WIDTHS
    widths = _sizes(opts["widths"] if opts["widths"] is not None else default_widths, "--widths")
    if not widths and not depths:
        raise UserError("give --widths or --depths (two sizes or more)")
    for key in ("batch_size", "block_size"):
        if opts[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {opts[key]}")
    if not opts["tolerance"] > 0:
        raise UserError(f"--tolerance must be > 0, got {opts['tolerance']}")
    args.update(batch_size=opts["batch_size"], block_size=opts["block_size"])
    cfg = load_train_config(opts["experiment"], args)
    out = Path(opts["out"] or f"coord_check_{cfg.parametrization}").expanduser()
    log(
        f"[raygpt] coord-check {cfg.parametrization}, {cfg.optimizer} at lr "
        f"{cfg.learning_rate:g}: widths {widths or '-'} (n_layer {cfg.n_layer}), depths "
        f"{depths or '-'} (n_embd {cfg.n_embd}), {opts['steps']} steps, "
        f"{cfg.batch_size} x {cfg.block_size} tokens, base {cfg.mup_base_width} wide, "
        f"{cfg.mup_base_depth} deep"
    )
    rows = coord_check.run(
        cfg, widths, depths, opts["steps"], opts["seeds"], opts["device"], log=log
    )
    files = coord_check.write_table(rows, out)
    files.append(coord_check.plot(rows, out / "coord_check.png"))
    results = coord_check.verdicts(rows, opts["tolerance"])
    log(f"[raygpt] slope of log RMS vs log size at step {opts['steps']}:")
    for verdict in results:
        log(verdict.line(opts["tolerance"]))
    failed = [v for v in results if v.passed is False]
    checked = [v for v in results if v.passed is not None]
    summary = "pass" if not failed else "FAIL: " + ", ".join(f"{v.axis} {v.layer}" for v in failed)
    log(
        f"[raygpt] {cfg.parametrization}: {len(checked) - len(failed)} of {len(checked)} "
        f"checked lines as expected: {summary}; wrote {', '.join(str(f) for f in files)}"
    )
    return (1 if failed else 0), results


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    return check(argv)[0]


if __name__ == "__main__":
    sys.exit(main())
