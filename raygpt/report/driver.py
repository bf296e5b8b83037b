"""`python -m raygpt.report SWEEP_DIR`: which optimizer, at which learning rate?

Prints the summary of a sweep (or a single run) folder and writes its plots
beside the files (or into `--out`): what the folder holds is read by
tables.py, summarized by summary.py (compared at equal budget by comparisons.py), drawn
by plots.py.

`python -m raygpt.report --lr-law SWEEP [SWEEP ...]` fits best lr = a * N^alpha *
D^beta per optimizer over the sweeps' trials (in transfer/: law_rows reads them, law fits,
on fit and trend) and writes lr_law.json and lr_law.png (law_outputs) into the first
sweep's folder (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from raygpt import storage
from raygpt.errors import UserError, exit_on_user_error
from raygpt.report.plots import (
    PLOT_FILES,
    PlotTarget,
    plot_loss_curves,
    plot_lr_sensitivity,
    plot_throughput,
)
from raygpt.report.summary import format_summary, summarize
from raygpt.report.tables import folder_storage, load
from raygpt.report.transfer import law as lr_law
from raygpt.report.transfer import law_outputs, law_rows
from raygpt.storage import Storage

# --------------------------------------------------------------------------- render / CLI


def render(
    where: str | Path | Storage,
    out_dir: str | Path | None = None,
    plots: bool = True,
    gpu_hour_price: float | None = None,
) -> tuple[str, list[Path | str]]:
    """Summary text and the PNGs written (into out_dir, default the sweep or run folder)."""
    folder = folder_storage(where)
    trials, steps, metadata = load(folder)
    name = metadata.get("name")
    text = format_summary(summarize(trials, steps, name=name, gpu_hour_price=gpu_hour_price))
    written: list[Path | str] = []
    if not plots:
        return text, written
    out = folder if out_dir is None else storage.resolve(str(out_dir), check=False)

    def target(file_name: str) -> PlotTarget:
        return (out, f"{out.root}/{file_name}")

    # A single training run has one learning rate: no sensitivity curve to draw.
    single_run = not metadata["has_trials_file"] and trials is not None and len(trials) <= 1
    if trials is not None and len(trials) and not single_run:
        written.append(plot_lr_sensitivity(trials, target(PLOT_FILES[0]), name, steps))
    if steps is not None and len(steps):
        written.append(plot_loss_curves(steps, target(PLOT_FILES[1]), name))
        written.append(plot_throughput(steps, target(PLOT_FILES[2]), name))
    return text, written


def render_lr_law(
    sweeps: list[str],
    out_dir: str | Path | None = None,
    predict: str | None = None,
    extrapolate: bool = False,
    plots: bool = True,
) -> tuple[list[str], list[Path | str], dict]:
    """The --lr-law lines, the files written and lr_law.json's content.

    Everything that can refuse (a bad --predict, a prediction too far out) does so
    before anything is written."""
    point = law_outputs.parse_point(predict) if predict is not None else None
    shown = [folder_storage(s).display() for s in sweeps]
    laws, record, lines = law_outputs.outcome(
        law_rows.read_sweeps(sweeps), shown, point, extrapolate
    )
    out = (
        folder_storage(sweeps[0]) if out_dir is None else storage.resolve(str(out_dir), check=False)
    )
    written = law_outputs.write_outputs(
        out, record, laws, plot=plots, name=shown[0].rstrip("/").rsplit("/", 1)[-1]
    )
    return lines, written, record


def _price(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(
            f"--gpu-hour-price {text!r} must be a number >= 0 (the price of a GPU-hour)"
        )
    return value


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.report",
        description="Summarize a raygpt sweep (or run) folder: best learning rate per optimizer, "
        "status counts, compute, and plots.",
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        help="sweep or run folder: <storage>/<name>, a local path or s3://, gs://",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the PNGs and lr_law.json (default: the (first) sweep folder)",
    )
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")
    parser.add_argument(
        "--gpu-hour-price",
        type=_price,
        default=None,
        metavar="PRICE",
        help="the price of one GPU-hour: the summary adds the sweep's cost (its trials' "
        "GPU-hours x PRICE)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    parser.add_argument(
        "--lr-law",
        nargs="+",
        metavar="SWEEP",
        default=None,
        help="fit best lr = a * N^alpha * D^beta per optimizer over these sweeps' trials "
        "(N: non-embedding parameters, D: tokens trained); writes lr_law.json and lr_law.png "
        "into the first sweep's folder (or --out)",
    )
    parser.add_argument(
        "--predict",
        metavar="N=...,D=...",
        default=None,
        help="with --lr-law: the law's lr at this size, e.g. N=124M,D=2.5e9; an axis the "
        f"sweeps did not vary may be left out. Refused beyond {lr_law.MAX_FACTOR:g}x outside "
        "the fitted range",
    )
    parser.add_argument(
        "--extrapolate",
        action="store_true",
        help=f"with --lr-law --predict: predict beyond {lr_law.MAX_FACTOR:g}x outside the "
        "fitted range",
    )
    args = parser.parse_args(argv)
    if args.lr_law is not None:
        if args.sweep_dir is not None:
            raise UserError(
                f"--lr-law takes the sweep folders itself: put {args.sweep_dir} after --lr-law"
            )
        lines, written, record = render_lr_law(
            args.lr_law, args.out, args.predict, args.extrapolate, plots=not args.no_plots
        )
        if args.json:
            print(json.dumps(record, indent=2, default=str))
            return 0
        print("\n".join(lines))
        print()
        for path in written:
            print(f"wrote {path}")
        return 0
    if args.predict is not None or args.extrapolate:
        raise UserError("--predict and --extrapolate go with --lr-law SWEEP [SWEEP ...]")
    if args.sweep_dir is None:
        parser.error("give a sweep or run folder, or --lr-law SWEEP [SWEEP ...]")
    if args.json:
        trials, steps, metadata = load(args.sweep_dir)
        summary = summarize(
            trials, steps, name=metadata.get("name"), gpu_hour_price=args.gpu_hour_price
        )
        print(json.dumps(summary, indent=2, default=str))
        return 0
    text, pngs = render(
        args.sweep_dir, args.out, plots=not args.no_plots, gpu_hour_price=args.gpu_hour_price
    )
    print(text)
    if pngs:
        print()
        for png in pngs:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
