"""`python -m raygpt.train [EXPERIMENT.toml] [--key value ...]`: flags, then the driver.

The flags and the experiment file are parsed and validated with the config layer alone,
before torch and Ray are imported: a typo or a bad value costs a fraction of a second,
not the seconds those imports take. The run itself is raygpt.train.driver.run.
"""

from __future__ import annotations

from raygpt.config.io import OneLineArgumentParser
from raygpt.config.train import add_train_flags, load_train_config
from raygpt.errors import exit_on_user_error


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.train",
        description="Train a GPT with Ray Train (DDP across workers and nodes).",
    )
    parser.add_argument("experiment", nargs="?", help="experiment TOML file (keys as below)")
    add_train_flags(parser, title="config keys (TOML key = flag name)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    experiment = args.pop("experiment")
    cfg = load_train_config(experiment, args)
    # The storage too, before torch and Ray import: a bad URI, bucket or credential is
    # one line in about a second. The driver resolves it again (cheap) for its own use.
    from raygpt import storage

    storage.resolve(cfg.storage_path)
    from raygpt.train import driver  # torch and Ray, for a config that passed its checks

    summary = driver.run(cfg)
    return 1 if summary["diverged"] else 0
