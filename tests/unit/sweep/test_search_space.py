"""--search-space specs: parsing, every bad input as one line, Tune and Optuna adapters (no Ray
cluster: building domains starts nothing)."""

from __future__ import annotations

import pytest

from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.sweep.space import (
    Dimension,
    lr_key,
    parse_search_space,
    searchable_keys,
    tune_param_space,
)


def test_ranges_logs_and_lists_parse_to_typed_dimensions():
    dims = parse_search_space(
        [
            "weight_decay=0:0.2",
            "grad_clip=0.1:10:log",
            "warmup-steps=0:200",  # flag spelling works too
            "batch_size=8:64:log",
            "beta2=0.95,0.99,0.999",
            "lr_schedule=cosine,wsd",
            "decay_lr=true,false",
        ]
    )
    assert dims == [
        Dimension("weight_decay", low=0.0, high=0.2),
        Dimension("grad_clip", low=0.1, high=10.0, log=True),
        Dimension("warmup_steps", low=0, high=200, integer=True),
        Dimension("batch_size", low=8, high=64, log=True, integer=True),
        Dimension("beta2", values=(0.95, 0.99, 0.999)),
        Dimension("lr_schedule", values=("cosine", "wsd")),
        Dimension("decay_lr", values=(True, False)),
    ]
    assert isinstance(dims[2].low, int) and isinstance(dims[0].low, float)


def test_a_flag_list_split_at_commas_is_joined_back():
    # config/io.py (coerce) splits a list flag at commas and spaces before the parser sees it.
    assert parse_search_space(["beta2=0.95", "0.99", "weight_decay=0:0.1"]) == [
        Dimension("beta2", values=(0.95, 0.99)),
        Dimension("weight_decay", low=0.0, high=0.1),
    ]


def test_the_issue_keys_are_searchable_and_run_settings_are_not():
    keys = searchable_keys()
    for key in ("weight_decay", "warmup_steps", "beta2", "batch_size", "grad_clip", "lr_schedule"):
        assert key in keys
    for key in ("optimizer", "learning_rate", "max_steps", "storage_path", "dataset", "name"):
        assert key not in keys


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("weight_decy=0:0.1", "unknown key 'weight_decy'; did you mean weight_decay?"),
        ("zzz=1:2", "unknown key 'zzz'; searchable: n_layer"),
        ("learning_rate=1e-4:1e-2", "not searchable: each optimizer has its own range"),
        ("max_steps=100:200", "max_steps is not searchable"),
        ("optimizer=adamw,sgd", "optimizer is not searchable: the sweep's --optimizers"),
        ("weight_decay=0.2:0.1", "needs LO < HI, got LO=0.2 HI=0.1"),
        ("weight_decay=0.1:0.1", "needs LO < HI"),
        ("weight_decay=0:0.1:log", "a log range needs LO > 0, got LO=0"),
        ("grad_clip=-1:1:log", "a log range needs LO > 0, got LO=-1"),
        ("weight_decay=0:0.1:lin", "is not KEY=LO:HI, KEY=LO:HI:log or KEY=a,b,c"),
        ("weight_decay=0:0.1:2:log", "is not KEY=LO:HI"),
        ("weight_decay=abc:1", "weight_decay='abc' in --search-space 'weight_decay=abc:1' is not"),
        ("beta2=0.9,high", "beta2='high' in --search-space"),
        ("warmup_steps=0:10.5", "warmup_steps='10.5' in --search-space"),
        ("weight_decay", "is not KEY=LO:HI"),
        ("weight_decay=", "is not KEY=LO:HI"),
        ("=0:1", "is not KEY=LO:HI"),
        ("weight_decay=0.1", "fixes one value; set it with --weight-decay 0.1"),
        ("beta2=0.9,,0.99", "has an empty value"),
        ("beta2=0.9,0.9", "repeats a value"),
        ("lr_schedule=cosine:wsd", "lr_schedule is not numeric; list its values"),
        ("lr_schedule=cosine,linear", "lr_schedule='linear' is not one of cosine, wsd"),
        ("beta2=0.9:1.5", "beta2=1.5 must be in [0, 1)"),  # the config's own check, per bound
        ("weight_decay=-0.1:0.1", "weight_decay=-0.1 must be >= 0"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, fragment):
    with pytest.raises(UserError) as err:
        parse_search_space([spec])
    message = str(err.value)
    assert fragment in message and "\n" not in message


def test_a_key_given_twice_is_refused():
    with pytest.raises(UserError, match="names weight_decay twice"):
        parse_search_space(["weight_decay=0:0.1", "weight_decay=0.2,0.3"])


def test_bounds_are_checked_against_the_sweep_base_config():
    assert parse_search_space(["n_head=2,3"], TrainConfig(n_embd=96))
    with pytest.raises(UserError, match="n_embd=128 is not divisible by n_head=3"):
        parse_search_space(["n_head=2,3"], TrainConfig(n_embd=128))


def test_tune_space_merges_per_optimizer_learning_rates():
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    dims = parse_search_space(
        ["weight_decay=1e-3:0.3:log", "warmup_steps=0:200", "beta2=0.95,0.99"]
    )
    ranges = {"adamw": (1e-4, 1e-2), "muon": (3e-3, 3e-1)}
    space = tune_param_space(dims, ranges)
    assert list(space) == [
        "optimizer",
        lr_key("adamw"),
        lr_key("muon"),
        "weight_decay",
        "warmup_steps",
        "beta2",
    ]
    assert space["optimizer"].categories == ["adamw", "muon"]
    assert (space["muon_learning_rate"].lower, space["muon_learning_rate"].upper) == (3e-3, 3e-1)
    # Tune's integer upper bound is exclusive: 200 itself stays reachable.
    assert (space["warmup_steps"].lower, space["warmup_steps"].upper) == (0, 201)
    assert isinstance(space["weight_decay"], tune.search.sample.Float)
    # OptunaSearch takes the flat space as it is, with the same inclusive bounds.
    optuna_space = OptunaSearch.convert_search_space(space)
    assert optuna_space["warmup_steps"].high == 200 and optuna_space["weight_decay"].log


class _Trial:
    """Records what an Optuna define-by-run space asks for."""

    def __init__(self):
        self.calls = []

    def suggest_float(self, name, low, high, log=False):
        self.calls.append(("float", name, low, high, log))
        return low

    def suggest_int(self, name, low, high, log=False):
        self.calls.append(("int", name, low, high, log))
        return low

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, choices))
        return choices[0]


def test_optuna_define_by_run_and_grid_values():
    dims = parse_search_space(
        ["weight_decay=1e-3:1e-1:log", "warmup_steps=0:10", "beta2=0.95,0.99"]
    )
    trial = _Trial()
    for dim in dims:
        dim.suggest(trial)
    assert trial.calls == [
        ("float", "weight_decay", 1e-3, 1e-1, True),
        ("int", "warmup_steps", 0, 10, False),
        ("categorical", "beta2", [0.95, 0.99]),
    ]
    assert dims[0].grid(3) == pytest.approx([1e-3, 1e-2, 1e-1])
    assert dims[1].grid(4) == [0, 3, 7, 10]
    assert dims[2].grid(5) == [0.95, 0.99]


def test_every_optimizer_has_a_default_lr_range():
    from raygpt.config.choices import OPTIMIZERS
    from raygpt.sweep.config import DEFAULT_LR_RANGES

    assert set(DEFAULT_LR_RANGES) == set(OPTIMIZERS)
    assert all(0 < lo < hi for lo, hi in DEFAULT_LR_RANGES.values())
