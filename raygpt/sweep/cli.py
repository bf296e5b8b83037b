"""`python -m raygpt.sweep [EXPERIMENT.toml] --optimizers adamw,sgd`: flags, then the driver.

The flags, the experiment file and its `[sweep]` table are parsed and validated with the
config layer alone, before torch, Ray and Tune are imported: a typo or a bad range costs
a fraction of a second. The sweep itself is raygpt.sweep.driver.run (a transfer:
raygpt.sweep.transfer.run, one sweep per proxy size).

With `--service URL` (or $RAYGPT_SERVICE) the sweep, once it passes the same checks, is
sent to the team service instead (raygpt.sweep.remote).
"""

from __future__ import annotations

import argparse
import sys

from raygpt.config.io import OneLineArgumentParser, add_dataclass_flags
from raygpt.config.train import TrainConfig, add_train_flags
from raygpt.errors import exit_on_user_error
from raygpt.sweep import remote as service
from raygpt.sweep.config import SWEEP_OWNED_TRAIN_KEYS, SweepConfig, load_configs

# SweepConfig's keys whose flags add_transfer_flags declares (the dataclass flags skip them).
TRANSFER_FLAG_KEYS = ("transfer", "target", "confirm", "gpu_hour_price")


def add_transfer_flags(parser: argparse.ArgumentParser) -> None:
    """--gpu-hour-price and the transfer's flags, on the sweep's parser."""
    parser.add_argument(
        "--gpu-hour-price",
        dest="gpu_hour_price",
        default=argparse.SUPPRESS,
        metavar="PRICE",
        help="the price of one GPU-hour: the summary adds the sweep's cost",
    )
    group = parser.add_argument_group(
        "transfer (sweep small proxies, predict the target's learning rate; docs/transfer.md)"
    )
    group.add_argument(
        "--transfer",
        dest="transfer",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=a,b,c",
        help="one sweep per value of a model size key (n_embd, n_layer, n_head), the other "
        "keys at the experiment's; repeat for another axis (e.g. --transfer n_embd=64,128,256)",
    )
    group.add_argument(
        "--target",
        dest="target",
        default=argparse.SUPPRESS,
        metavar="KEY=N,...",
        help="with --transfer: the model to predict the learning rate for, e.g. "
        "n_embd=768,n_layer=12 (keys left out stay at the experiment's)",
    )
    group.add_argument(
        "--confirm",
        dest="confirm",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="with --transfer: train the target at the prediction and at 2x and 1/2 of it, "
        "and say whether the prediction was the best of the three",
    )


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.sweep",
        description="Search optimizer x learning rate with Ray Tune (Optuna + ASHA).",
    )
    parser.add_argument("experiment", nargs="?", help="experiment TOML ([sweep] table + keys)")
    add_dataclass_flags(
        parser,
        SweepConfig,
        exclude=("lr_range", "search_space", "verbose", *TRANSFER_FLAG_KEYS),
        title="sweep keys",
    )
    parser.add_argument(
        "--lr-range",
        dest="lr_range",
        action="append",
        default=argparse.SUPPRESS,
        metavar="OPT=LO:HI",
        help="learning-rate range for one optimizer (repeatable)",
    )
    parser.add_argument(
        "--search-space",
        dest="search_space",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=LO:HI[:log]|KEY=a,b,c",
        help="another TrainConfig key to search, e.g. weight_decay=1e-3:0.3:log (repeatable)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="verbose",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="also print every trial's lines and Ray's own output on the console",
    )
    add_transfer_flags(parser)
    add_service_flags(parser)
    add_train_flags(parser, exclude=SWEEP_OWNED_TRAIN_KEYS, title="training keys (per trial)")
    return parser


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the team service (docs/service.md)")
    group.add_argument(
        "--service",
        dest="service",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"submit the sweep to the team service at URL instead of running it here "
        f"(default: ${service.SERVICE_ENV}; an empty URL runs it here)",
    )
    group.add_argument(
        "--token",
        dest="token",
        default=argparse.SUPPRESS,
        metavar="TOKEN",
        help=f"with --service: your API token (default: ${service.TOKEN_ENV}, which keeps it out of "
        "the shell's history)",
    )
    group.add_argument(
        "--follow",
        dest="follow",
        action="store_true",
        default=argparse.SUPPRESS,
        help="with --service: print the sweep's log until it ends; exit 0 if it succeeded",
    )


def configs_from_argv(argv: list[str] | None) -> tuple[SweepConfig, TrainConfig]:
    args = vars(build_parser().parse_args(argv))
    for key in service.SERVICE_KEYS:
        args.pop(key, None)
    experiment = args.pop("experiment")
    return load_configs(experiment, args)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    sweep, train = configs_from_argv(argv)
    remote = service.service_options(vars(build_parser().parse_args(argv)))
    if remote is not None:
        return service.submit(*remote, build_parser(), argv, train)
    # The storage too, before torch, Ray and Tune import: a bad URI, bucket or credential
    # is one line in about a second. The driver resolves it again (cheap) for its own use.
    from raygpt import storage

    storage.resolve(sweep.storage_path)
    # torch, Ray and Tune, for configs that passed their checks
    from raygpt.sweep import driver, transfer

    if sweep.transfer:  # one sweep per proxy size, each checked as a sweep is
        found = transfer.run(sweep, train, driver.run, driver.check_found_something)
        transfer.check_predicted(found)
    else:
        driver.check_found_something(driver.run(sweep, train))
    return 0
