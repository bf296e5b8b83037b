"""Config loading: precedence, types, suggestions, paths (no Ray)."""

from __future__ import annotations

import pytest

from raygpt.config.train import load_train_config
from raygpt.errors import UserError
from raygpt.train import cli as train_cli


def _flags(*argv: str) -> tuple[str | None, dict]:
    args = vars(train_cli.build_parser().parse_args(list(argv)))
    return args.pop("experiment"), args


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(
        'learning_rate = 3e-4\nmax_steps = 50\noptimizer = "sgd"\n[sweep]\nnum_samples = 4\n'
    )
    cfg = load_train_config(*_flags(str(exp), "--max-steps", "70", "--resume"))
    assert (cfg.learning_rate, cfg.max_steps, cfg.optimizer) == (3e-4, 70, "sgd")
    assert cfg.resume is True and cfg.n_layer == 4  # a bare boolean flag means true


def test_relative_data_file_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("hello world\n" * 100)
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(*_flags("--data-file", "corpus.txt"))
    # Ray workers and Tune trials run elsewhere: the path must not depend on the cwd.
    assert cfg.data_file == str(tmp_path / "corpus.txt")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--max-steps", "2.5"], "max_steps='2.5' in flag --max-steps is not an integer"),
        (["--bias", "maybe"], "bias='maybe' in flag --bias is not true or false"),
        (["--n-embd", "100", "--n-head", "3"], "n_embd=100 is not divisible by n_head=3"),
        (["--tokens-per-step", "1000"], "tokens_per_step=1000 is not a multiple"),
        (["--resume", "--overwrite"], "contradict"),
        (["--max-stesp", "3"], "did you mean --max-steps?"),
        (["--start-timeout-s", "-1"], "start_timeout_s=-1.0 must be >= 0 (0: wait for free"),
    ],
)
def test_bad_values_are_named(argv, fragment):
    with pytest.raises(UserError) as err:
        load_train_config(*_flags(*argv))
    assert fragment in str(err.value)
