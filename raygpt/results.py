"""Every file of results raygpt writes, written through one `storage.Storage`.

Local folders, NFS mounts and object stores (s3://, gs://) take the same code:
each file is written whole, once (an object store has no append and no atomic
rename, and a PUT is atomic), so nothing here appends to or rewrites a growing
file.

Layout of a run folder `<storage>/<name>/` (a sweep trial's is
`<sweep>/runs/<trial_id>/`):

    steps/part-<first>-<last>.parquet   step rows first..last, written by rank 0 at each report
    checkpoint_<step>/state.pt          written by Ray Train (see checkpoint.py)
    tensorboard/events.out.tfevents.*   one event file per report (a sweep keeps them
                                        in <sweep>/tensorboard/<trial_id>/)
    run.json                            config, versions, hardware

A sweep folder adds `trials.parquet` (one row per trial, rewritten whole: one
PUT), `sweep.json` and the PNG plots. Readers see every part of a folder as one
table (`read_steps`), so "the steps of a sweep" is a directory, not a file.

Why parts: rewriting one steps.parquet at every report costs O(N^2) over a run
and cannot be done atomically on object storage. A part is written by rank 0
before the report that announces it, so a killed driver loses no row; a
restarted run replays from its checkpoint, whose step is always a part
boundary, and rewrites the same part names with the same rows.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raygpt.redact import redact_config
from raygpt.storage import Storage

STEP_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("trial_id", pa.string()),
        ("optimizer", pa.string()),
        ("learning_rate", pa.float64()),
        ("step", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("train_loss", pa.float64()),
        ("val_loss", pa.float64()),
        ("cooled_val_loss", pa.float64()),  # a rung's cooled copy (rung_cooldown.py), if any
        ("eval_train_loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("step_time_ms", pa.float64()),
        ("tokens_per_sec", pa.float64()),
        ("mfu", pa.float64()),
        ("hellaswag_acc_norm", pa.float64()),  # at hellaswag_every steps, else null
    ]
)
STEP_COLUMNS = tuple(STEP_SCHEMA.names)

# One row per sweep trial; status is one of raygpt.status.ALL.
TRIAL_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("optimizer", pa.string()),
        ("learning_rate", pa.float64()),
        ("momentum", pa.float64()),  # sampled for optimizer = momentum only, else null
        ("params", pa.string()),  # every sampled hyperparameter, as JSON
        ("status", pa.string()),
        ("error", pa.string()),
        ("steps", pa.int64()),
        ("best_val_loss", pa.float64()),
        ("final_train_loss", pa.float64()),
        ("final_val_loss", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("train_seconds", pa.float64()),  # sum of step times
        ("tokens", pa.int64()),
        ("mean_tokens_per_sec", pa.float64()),
        ("mean_mfu", pa.float64()),
        ("checkpoint_path", pa.string()),
        # Seeds: a configuration (every param but the seed) repeated over seeds.
        ("seed", pa.int64()),
        ("config_key", pa.string()),
        ("phase", pa.string()),  # search, or confirm (--confirm-top reruns)
        ("steps_to_target", pa.int64()),  # first eval step with val <= --target-loss
        # Timeline (Unix seconds): queued by Tune, its process started, the loop entered
        # (workers up), first and last training step, torn down. Overhead is the trial's
        # time outside training and evaluation: up to its first step and after its last.
        ("queued_at", pa.float64()),
        ("started_at", pa.float64()),
        ("workers_up_at", pa.float64()),
        ("first_step_at", pa.float64()),
        ("last_step_at", pa.float64()),
        ("torn_down_at", pa.float64()),
        ("overhead_seconds", pa.float64()),
        ("cooldown_seconds", pa.float64()),  # training the rung cooldowns' copies
        ("hellaswag_acc_norm", pa.float64()),  # the latest, with --hellaswag-every
        # Compute (report/compute.py says how each is counted): the model's size as the
        # trial's own model reported it (from its config until it reports), its
        # parametrization, training FLOPs (per-token FLOPs x tokens), and device time.
        ("n_params", pa.int64()),  # non-embedding, GPT.n_params(non_embedding=True)
        ("n_layer", pa.int64()),
        ("n_embd", pa.int64()),
        ("parametrization", pa.string()),
        ("flops", pa.float64()),
        ("device_seconds", pa.float64()),  # training time x devices (GPUs, or CPU workers)
        ("gpu_hours", pa.float64()),  # device_seconds / 3600 on GPUs, 0 on CPUs
    ]
)

TRIALS_FILE = "trials.parquet"
STEPS_DIR = "steps"
TENSORBOARD_DIR = "tensorboard"
RUNS_DIR = "runs"
RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
_PART_RE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")


# --------------------------------------------------------------------------- whole files


def with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    # A footer is read by anyone with the file: no password of a URI in the config.
    encoded = {
        f"raygpt.{k}".encode(): json.dumps(redact_config(v), default=str).encode()
        for k, v in metadata.items()
    }
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **encoded})


def decode_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The `raygpt.*` metadata of a Parquet schema, decoded."""
    raw = schema.metadata or {}
    return {
        k.decode().removeprefix("raygpt."): json.loads(v)
        for k, v in raw.items()
        if k.startswith(b"raygpt.")
    }


def write_table(storage: Storage, fs_path: str, table: pa.Table) -> None:
    """One Parquet file, written whole (atomic: temp + rename locally, one PUT remotely)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(fs_path, sink.getvalue().to_pybytes())


READ_RETRIES = 4


def parse_parquet(data: bytes) -> pa.Table:
    """One Parquet file's bytes as a table, decoded on this thread.

    `pq.read_table` and `pyarrow.dataset` scan through Arrow's background scanner
    threads, which can still be alive when the interpreter exits and then abort the
    process ("terminate called without an active exception", exit -6) after its work
    is done. A `ParquetFile` read on the calling thread leaves no thread behind.
    """
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)


def read_table(storage: Storage, fs_path: str) -> pa.Table | None:
    """A Parquet file, or None when it is not there.

    On object storage a read is a HEAD and then ranged GETs, so a reader that overlaps
    a rewrite of the object (trials.parquet while a sweep runs) can get bytes of both
    versions. Every writer here replaces a file whole within a second, so there a read
    that does not parse is retried a few times before it counts as damaged. A local
    file is replaced by a rename, which no reader sees halfway, so it is read once.
    """
    attempts = 1 if storage.is_local else READ_RETRIES
    for attempt in range(attempts):
        try:
            data = storage.read_bytes(fs_path)
        except FileNotFoundError:
            return None
        try:
            return parse_parquet(data)
        except pa.ArrowInvalid:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def write_json(storage: Storage, fs_path: str, value: Any) -> None:
    """`value` as JSON, secrets masked (redact_config): records are for people to read."""
    storage.write_bytes(fs_path, json.dumps(redact_config(value), indent=2, default=str).encode())


def write_png(storage: Storage, fs_path: str, fig, dpi: int) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    storage.write_bytes(fs_path, buffer.getvalue())


# --------------------------------------------------------------------------- step rows


def part_name(first: int, last: int) -> str:
    return f"part-{first:09d}-{last:09d}.parquet"


def full_row(row: dict[str, Any]) -> dict[str, Any]:
    return {col: row.get(col) for col in STEP_COLUMNS}


def step_table(rows: Iterable[dict[str, Any]], metadata: dict[str, Any] | None = None) -> pa.Table:
    table = pa.Table.from_pylist([full_row(r) for r in rows], schema=STEP_SCHEMA)
    return with_metadata(table, metadata) if metadata else table


def write_step_part(
    storage: Storage, run_path: str, rows: list[dict[str, Any]], metadata: dict[str, Any]
) -> str | None:
    """Write rows (consecutive steps of one run) as one immutable part; return its path."""
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    path = f"{run_path}/{STEPS_DIR}/{part_name(min(steps), max(steps))}"
    write_table(storage, path, step_table(rows, metadata))
    return path


def drop_parts_after(storage: Storage, run_path: str, step: int) -> int:
    """Delete a run's parts that start after `step` (rows a resumed run will write again).

    A run resumed from the checkpoint of `step` replays everything after it;
    parts written past it by the interrupted attempt would otherwise outlive a
    change of report cadence. Returns how many parts went.
    """
    return drop_files_after(storage, f"{run_path}/{STEPS_DIR}", _PART_RE, step)


def drop_files_after(storage: Storage, folder: str, pattern: re.Pattern, step: int) -> int:
    """Delete the files in `folder` whose name `pattern` matches with a first step (its
    group 1) after `step`. Returns how many went."""
    dropped = 0
    for name in storage.list_dir(folder):
        match = pattern.match(name)
        if match and int(match.group(1)) > step:
            storage.delete_file(f"{folder}/{name}")
            dropped += 1
    return dropped


def step_part_paths(storage: Storage, folder: str) -> list[str]:
    """Every step part under a run or sweep folder (its own and its trials'), in write order.

    One recursive listing, not one per trial: on object storage each listing
    is a request.
    """
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    found = []
    for info in storage.fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not _PART_RE.match(info.base_name):
            continue
        parent = info.path.rsplit("/", 2)
        if len(parent) == 3 and parent[1] == STEPS_DIR:
            found.append(info.path)
    # Within a run, part names sort by step; runs sort by their folder.
    return sorted(found)


def read_steps(storage: Storage, folder: str) -> tuple[pa.Table | None, dict[str, Any]]:
    """All step rows of a run or sweep folder as one table, and the parts' raygpt metadata.

    Rows are unique on (trial_id, step): where a replayed step appears twice,
    the copy from the later part wins. None when the folder holds no rows.
    """
    metadata: dict[str, Any] = {}
    paths = step_part_paths(storage, folder)
    # Parts are small and many; on object storage each is a GET, so they are fetched
    # side by side.
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        parts = [
            t for t in pool.map(lambda path: read_table(storage, path), paths) if t is not None
        ]
    if parts:
        metadata.update(decode_metadata(parts[0].schema))
    tables = [conform(part, STEP_SCHEMA) for part in parts]
    if not tables:
        return None, metadata
    table = pa.concat_tables(tables)
    return dedupe_steps(table), metadata


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table from an older or newer writer with `schema`'s columns, in order: missing
    ones as nulls, extra ones dropped."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(len(table), field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def dedupe_steps(table: pa.Table) -> pa.Table:
    """Keep the last row of each (trial_id, step), sorted by trial and step."""
    table = table.replace_schema_metadata(None)
    keyed = table.append_column("_row", pa.array(range(len(table)), pa.int64()))
    keyed = keyed.set_column(
        keyed.schema.get_field_index("trial_id"),
        "trial_id",
        pc.fill_null(keyed["trial_id"], ""),
    )
    last = keyed.group_by(["trial_id", "step"], use_threads=False).aggregate([("_row", "max")])
    kept = table.take(last["_row_max"])
    return kept.sort_by([("trial_id", "ascending"), ("step", "ascending")])
