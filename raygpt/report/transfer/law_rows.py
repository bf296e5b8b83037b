"""A sweep's trials as the points of a learning-rate law: each with its N and D.

N is the model's non-embedding parameter count, D the tokens each trial was set to
train. Both come from what trials.parquet holds:

- N: the trial's `n_params` column, the count its own model reported (compute.py says
  what it counts). A table written before that column has it from the sweep's config in
  its footer (the `config` and `data` metadata) with the trial's own sampled keys
  (`params`) on top, counted by `sizes.non_embedding_params`, so a sweep that
  searched n_embd gives each trial its own N either way.
- D: max_steps x tokens_per_step from the same config, the budget the trial was given
  (a diverged trial belongs to the budget it was set, not to the tokens it saw before
  diverging); a completed trial whose config gives no budget has its `tokens` column.
- parametrization: the trial's `parametrization` column, else its config's, else sp.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from raygpt import results, status
from raygpt.errors import UserError
from raygpt.model.sizes import non_embedding_params, padded_vocab_size
from raygpt.report.tables import folder_storage
from raygpt.storage import Storage

N_MEANS = (
    "non-embedding parameters as GPT.n_params() counts them: the blocks, the final "
    "LayerNorm and the tied token embedding / output layer; not the position embeddings"
)
D_MEANS = "tokens each trial was set to train: max_steps x tokens_per_step"
# Keys that make a trial's N, D or place on the lr curve; any other searched key that
# varies within a curve is named in the law's notes.
_CURVE_KEYS = {
    "optimizer",
    "learning_rate",
    "seed",
    "n_layer",
    "n_embd",
    "n_head",
    "bias",
    "vocab_size",
    "max_steps",
    "tokens_per_step",
    "batch_size",
    "block_size",
    "num_workers",
}


def _trials_of(where: str | Path | Storage) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """trials.parquet's rows and decoded metadata, without reading the step parts."""
    store = folder_storage(where)
    shown = store.display()
    try:
        if not store.is_dir(store.root):
            raise UserError(f"no such folder: {shown}; give a sweep folder (<storage>/<name>)")
        table = results.read_table(store, f"{store.root}/{results.TRIALS_FILE}")
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot read {shown}: {str(err).splitlines()[0]}") from None
    if table is None:
        raise UserError(
            f"no {results.TRIALS_FILE} in {shown}: --lr-law reads the folders of sweeps "
            "(python -m raygpt.sweep)"
        )
    metadata = results.decode_metadata(table.schema)
    return results.conform(table, results.TRIAL_SCHEMA).to_pylist(), metadata, shown


def _n_from_config(cfg: Mapping[str, Any], vocab: int | None, shown: str) -> int:
    missing = [k for k in ("n_layer", "n_embd") if cfg.get(k) is None]
    if vocab is None:
        missing.append("data.vocab_size")
    if missing:
        raise UserError(
            f"{shown}: its trials.parquet records no n_params nor {', '.join(missing)}, so N "
            "cannot be counted; --lr-law needs the table and footer raygpt.sweep writes"
        )
    return non_embedding_params(
        int(cfg["n_layer"]),
        int(cfg["n_embd"]),
        padded_vocab_size(int(vocab)),
        bool(cfg.get("bias")),
    )


def budget(cfg: Mapping[str, Any]) -> int | None:
    """max_steps x tokens_per_step of a trial's config; None where it does not say."""
    tokens_per_step = cfg.get("tokens_per_step")
    if tokens_per_step is None and None not in (cfg.get("batch_size"), cfg.get("block_size")):
        tokens_per_step = (
            int(cfg["batch_size"]) * int(cfg["block_size"]) * int(cfg.get("num_workers") or 1)
        )
    steps = cfg.get("max_steps")
    return int(steps) * int(tokens_per_step) if steps is not None and tokens_per_step else None


def law_row(
    row: Mapping[str, Any], base: Mapping[str, Any], data: Mapping[str, Any], shown: str
) -> dict[str, Any] | None:
    """One trial as a law row: `row` (trials.parquet's columns, `params` as JSON) with "N",
    "D", "parametrization", "other" and "sweep" added (see `law_rows`); None where its D
    is unknown. `base` is its sweep's config, `data` its data record (the footer's
    `data`: its vocab_size counts N where the row has no n_params), `shown` its folder.

    `law_rows` reads these from a folder; the service's database keeps them per sweep and
    trial (raygpt.service.law), so both give one trial the same row."""
    params = json.loads(row.get("params") or "{}")
    cfg = {**base, **params}
    if (cfg.get("init_from") or "scratch") != "scratch":
        raise UserError(
            f"{shown}: its trials start from {cfg['init_from']}, not from scratch; a "
            "learning-rate law is fitted on models trained from scratch"
        )
    n = row.get("n_params")
    if n is None:
        n = _n_from_config(cfg, cfg.get("vocab_size") or data.get("vocab_size"), shown)
    d = budget(cfg)
    if d is None and row.get("status") == status.COMPLETED:
        d = row.get("tokens")
    if d is None:
        return None
    other = {k: v for k, v in sorted(params.items()) if k not in _CURVE_KEYS}
    return dict(row) | {
        "N": int(n),
        "D": int(d),
        "parametrization": str(row.get("parametrization") or cfg.get("parametrization") or "sp"),
        "other": json.dumps(other, default=str),
        "sweep": shown,
    }


def law_rows(where: str | Path | Storage) -> list[dict[str, Any]]:
    """One sweep's trials, each with its N, D and parametrization, for `fit_laws`.

    Each row is trials.parquet's, plus "N", "D", "parametrization" (see the module
    docstring), "other" (the sampled keys besides lr, seed, N and D, as JSON) and
    "sweep" (the folder). A trial whose D is unknown is left out.
    """
    rows, metadata, shown = _trials_of(where)
    base = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    data = metadata.get("data") if isinstance(metadata.get("data"), dict) else {}
    out = []
    for row in rows:
        found = law_row(row, base, data, shown)
        if found is not None:
            out.append(found)
    return out


def read_sweeps(sweeps: Sequence[str | Path | Storage]) -> list[dict[str, Any]]:
    """`law_rows` of every sweep, together."""
    if not sweeps:
        raise UserError("give at least one sweep folder")
    return [row for where in sweeps for row in law_rows(where)]
