"""`python -m raygpt.report SWEEP_DIR`: which optimizer, at which learning rate?

Prints the summary of a sweep (or a single run) folder and writes its plots
beside the files (or into `--out`): what the folder holds is read by
summary.py, compared at equal budget by comparisons.py, drawn by plots.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raygpt import storage
from raygpt.errors import exit_on_user_error
from raygpt.plots import (
    PLOT_FILES,
    PlotTarget,
    plot_loss_curves,
    plot_lr_sensitivity,
    plot_throughput,
)
from raygpt.storage import Storage
from raygpt.summary import (  # noqa: F401
    derive_trials,
    folder_storage,
    format_summary,
    load,
    summarize,
)

# --------------------------------------------------------------------------- render / CLI


def render(
    where: str | Path | Storage, out_dir: str | Path | None = None, plots: bool = True
) -> tuple[str, list[Path | str]]:
    """Summary text and the PNGs written (into out_dir, default the sweep or run folder)."""
    folder = folder_storage(where)
    trials, steps, metadata = load(folder)
    name = metadata.get("name")
    text = format_summary(summarize(trials, steps, name=name))
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raygpt.report",
        description="Summarize a raygpt sweep (or run) folder: best learning rate per optimizer, "
        "status counts, compute, and plots.",
    )
    parser.add_argument(
        "sweep_dir", help="sweep or run folder: <storage>/<name>, a local path or s3://, gs://"
    )
    parser.add_argument(
        "--out", default=None, help="folder for the PNGs (default: the sweep folder)"
    )
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead")
    args = parser.parse_args(argv)
    if args.json:
        trials, steps, metadata = load(args.sweep_dir)
        summary = summarize(trials, steps, name=metadata.get("name"))
        print(json.dumps(summary, indent=2, default=str))
        return 0
    text, pngs = render(args.sweep_dir, args.out, plots=not args.no_plots)
    print(text)
    if pngs:
        print()
        for png in pngs:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
