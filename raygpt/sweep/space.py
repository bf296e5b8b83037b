"""`--search-space` specs: which TrainConfig keys a sweep searches, and over what.

    KEY=LO:HI       uniform on [LO, HI]; an integer key draws integers LO..HI, both included
    KEY=LO:HI:log   log-uniform (LO > 0), e.g. weight_decay=1e-3:0.3:log
    KEY=a,b,c       one of these values, e.g. lr_schedule=cosine,wsd or batch_size=8,16,32

KEY is any numeric, true/false or named-choice key of TrainConfig (weight_decay,
warmup_steps, beta2, batch_size, grad_clip, lr_schedule, muon_momentum, ...) except
those the sweep owns or that fix what trials are compared on (`NOT_SEARCHABLE`).
Every bound and value is checked here, once, against the sweep's base config, so a
bad one is a one-line error before Ray starts rather than a failed trial.

The learning rate stays per optimizer (sweep.DEFAULT_LR_RANGES, --lr-range):
`tune_param_space` merges the two into one flat Ray Tune space.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

# config/io.py's field-type helpers, so that a spec's values are typed exactly as a flag's.
from raygpt.config.choices import DTYPES, LR_SCHEDULES, PARAMETRIZATIONS, TRI_STATE
from raygpt.config.io import coerce, field_types, unwrap_optional
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError

SOURCE = "--search-space"
FORMS = "KEY=LO:HI, KEY=LO:HI:log or KEY=a,b,c"

# String keys with a fixed set of values; other string keys are names and paths.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_schedule": LR_SCHEDULES,
    "dtype": DTYPES,
    "compile": TRI_STATE,
    "parametrization": PARAMETRIZATIONS,
}

_RUN = "a run setting, not a hyperparameter"
_BUDGET = "it fixes the budget and reporting every trial is compared at"
_DATA = "trials of one sweep share their data"
NOT_SEARCHABLE: dict[str, str] = {
    "optimizer": "the sweep's --optimizers chooses it",
    "learning_rate": "each optimizer has its own range: --lr-range OPT=LO:HI",
    "seed": "a seed is not a hyperparameter; repeat seeds instead",
    **dict.fromkeys(("name", "storage_path", "num_workers", "cpus_per_worker", "use_gpu"), _RUN),
    **dict.fromkeys(("placement_strategy", "address", "resume", "overwrite"), _RUN),
    **dict.fromkeys(("max_failures", "start_timeout_s", "peak_tflops", "eval_only"), _RUN),
    **dict.fromkeys(("eval_train",), _RUN),
    **dict.fromkeys(("sample_every", "sample_tokens", "hellaswag_every", "hellaswag_limit"), _RUN),
    **dict.fromkeys(("max_steps", "eval_interval", "eval_iters", "log_interval"), _BUDGET),
    **dict.fromkeys(("checkpoint_interval", "checkpoint_upload", "keep_checkpoints"), _BUDGET),
    **dict.fromkeys(("divergence_factor", "rung_cooldown", "cooldown_at"), _BUDGET),
    **dict.fromkeys(("dataset", "data_file", "tokenizer", "data_dir", "init_from"), _DATA),
    **dict.fromkeys(("vocab_size",), _DATA),
}


def lr_key(optimizer: str) -> str:
    """The search dimension of one optimizer's learning rate (sweep.trial_params reads it)."""
    return f"{optimizer}_learning_rate"


@dataclass(frozen=True)
class Dimension:
    """One searched key: a range (low, high, log, integer) or a list of values."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False
    values: tuple[Any, ...] = ()

    def domain(self) -> Any:
        """The Ray Tune domain (whose integer upper bounds are exclusive, hence + 1)."""
        from ray import tune

        if self.values:
            return tune.choice(list(self.values))
        if self.integer:
            sample = tune.lograndint if self.log else tune.randint
            return sample(self.low, self.high + 1)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)

    def suggest(self, trial: Any) -> Any:
        """Sample it in an Optuna define-by-run space (sweep.OptunaSpace)."""
        if self.values:
            return trial.suggest_categorical(self.key, list(self.values))
        if self.integer:
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def grid(self, points: int) -> list[Any]:
        """Values for --search grid: the list itself, or `points` spaced over the range."""
        if self.values:
            return list(self.values)
        import numpy as np

        spaced = (np.geomspace if self.log else np.linspace)(self.low, self.high, points)
        if self.integer:
            return sorted({round(float(v)) for v in spaced})
        return [float(v) for v in spaced]


def searchable_keys() -> list[str]:
    """TrainConfig keys a spec may name: numbers, true/false and CHOICES, less NOT_SEARCHABLE."""
    keys = []
    for key, tp in field_types(TrainConfig).items():
        base, _ = unwrap_optional(tp)
        if key not in NOT_SEARCHABLE and (base in (int, float, bool) or key in CHOICES):
            keys.append(key)
    return keys


def parse_search_space(specs: list[str], base: TrainConfig | None = None) -> list[Dimension]:
    """Dimensions from specs, each bound and value checked against `base` (default: defaults).

    A flag's list is split at commas before it gets here (config/io.py: coerce), so a piece
    without '=' continues the previous spec's values: ["beta2=0.95", "0.99"] is beta2=0.95,0.99.
    """
    base = TrainConfig() if base is None else base
    joined: list[str] = []
    for piece in specs:
        piece = piece.strip()
        if "=" in piece or not joined:
            joined.append(piece)
        elif piece:
            joined[-1] += "," + piece
    dims: list[Dimension] = []
    for spec in joined:
        dim = _parse_one(spec, base)
        if any(d.key == dim.key for d in dims):
            raise UserError(f"{SOURCE} names {dim.key} twice; give one spec per key")
        dims.append(dim)
    return dims


def _parse_one(spec: str, base: TrainConfig) -> Dimension:
    key, sep, text = spec.partition("=")
    key = key.strip().replace("-", "_")
    text = text.strip()
    if not sep or not key or not text:
        raise UserError(f"{SOURCE} {spec!r} is not {FORMS}")
    tp = _check_key(key)
    kind, _ = unwrap_optional(tp)
    source = f"{SOURCE} {spec!r}"
    if ":" in text:
        if kind not in (int, float):
            raise UserError(f"{source}: {key} is not numeric; list its values: {key}=a,b")
        dim = _parse_range(key, text, tp, kind is int, source)
        candidates = [dim.low, dim.high]
    elif "," in text:
        values = [v.strip() for v in text.split(",")]
        if "" in values:
            raise UserError(f"{source} has an empty value; write {key}=a,b,c")
        parsed = tuple(coerce(key, v, tp, source) for v in values)
        if kind is str and key in CHOICES:
            for value in parsed:
                if value not in CHOICES[key]:
                    raise UserError(
                        f"{source}: {key}={value!r} is not one of {', '.join(CHOICES[key])}"
                    )
        if len(set(parsed)) != len(parsed):
            raise UserError(f"{source} repeats a value")
        dim = Dimension(key, values=parsed)
        candidates = list(parsed)
    else:
        raise UserError(
            f"{source} fixes one value; set it with {'--' + key.replace('_', '-')} {text}, "
            f"or search it: {FORMS}"
        )
    for value in candidates:  # each bound and value must make a valid config
        try:
            dataclasses.replace(base, **{key: value}).validate()
        except UserError as err:
            raise UserError(f"{source}: {err}") from None
    return dim


def _check_key(key: str) -> Any:
    types = field_types(TrainConfig)
    if key in NOT_SEARCHABLE:
        raise UserError(f"{SOURCE}: {key} is not searchable: {NOT_SEARCHABLE[key]}")
    searchable = searchable_keys()
    if key not in searchable:
        if key in types:
            raise UserError(f"{SOURCE}: {key} is not a number, true/false or a named choice")
        close = difflib.get_close_matches(key, searchable, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; searchable: {', '.join(searchable)}"
        raise UserError(f"{SOURCE}: unknown key {key!r}{hint}")
    return types[key]


def _parse_range(key: str, text: str, tp: Any, integer: bool, source: str) -> Dimension:
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
        raise UserError(f"{source} is not {FORMS}")
    low, high = (coerce(key, p.strip(), tp, source) for p in parts[:2])
    if low is None or high is None:
        raise UserError(f"{source}: a range needs two numbers")
    log = len(parts) == 3
    if not low < high:
        raise UserError(f"{source} needs LO < HI, got LO={low:g} HI={high:g}")
    if log and not low > 0:
        raise UserError(f"{source}: a log range needs LO > 0, got LO={low:g}")
    return Dimension(key, low=low, high=high, log=log, integer=integer)


def tune_param_space(
    dims: list[Dimension], lr_ranges: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """One flat Ray Tune space: the optimizer, each optimizer's own log-uniform learning
    rate (`lr_key`; a trial uses its optimizer's and ignores the rest), and `dims`.

    Flat, so OptunaSearch can convert it and random search can sample it as is.
    """
    from ray import tune

    space: dict[str, Any] = {"optimizer": tune.choice(list(lr_ranges))}
    for optimizer, (low, high) in lr_ranges.items():
        space[lr_key(optimizer)] = tune.loguniform(low, high)
    for dim in dims:
        space[dim.key] = dim.domain()
    return space
