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
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
    ]
)

TRIALS_FILE = "trials.parquet"
STEPS_DIR = "steps"
LEGACY_STEPS_FILE = "steps.parquet"  # one rewritten file, as raygpt wrote before parts
TENSORBOARD_DIR = "tensorboard"
RUNS_DIR = "runs"
RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
_PART_RE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
_EVENTS_RE = re.compile(r"^events\.out\.tfevents\.(\d+)-(\d+)\.raygpt$")


# --------------------------------------------------------------------------- whole files


def with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    encoded = {
        f"raygpt.{k}".encode(): json.dumps(v, default=str).encode() for k, v in metadata.items()
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


def read_table(storage: Storage, fs_path: str) -> pa.Table | None:
    """A Parquet file, or None when it is not there.

    On object storage a read is a HEAD and then ranged GETs, so a reader that overlaps
    a rewrite of the object (trials.parquet while a sweep runs) can get bytes of both
    versions. Every writer here replaces a file whole within a second, so a read that
    does not parse is retried a few times before it counts as damaged.
    """
    for attempt in range(READ_RETRIES):
        try:
            data = storage.read_bytes(fs_path)
        except FileNotFoundError:
            return None
        try:
            return pq.read_table(pa.BufferReader(data))
        except pa.ArrowInvalid:
            if attempt == READ_RETRIES - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def write_json(storage: Storage, fs_path: str, value: Any) -> None:
    storage.write_bytes(fs_path, json.dumps(value, indent=2, default=str).encode())


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
    return _drop_after(storage, f"{run_path}/{STEPS_DIR}", _PART_RE, step)


def drop_tensorboard_after(storage: Storage, logdir: str, step: int) -> int:
    """As drop_parts_after, for the event files a resumed run will write again."""
    return _drop_after(storage, logdir, _EVENTS_RE, step)


def _drop_after(storage: Storage, folder: str, pattern: re.Pattern, step: int) -> int:
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
    tables: list[pa.Table] = []
    metadata: dict[str, Any] = {}
    legacy = read_table(storage, f"{folder}/{LEGACY_STEPS_FILE}")
    if legacy is not None:
        metadata.update(decode_metadata(legacy.schema))
        tables.append(conform(legacy, STEP_SCHEMA))
    paths = step_part_paths(storage, folder)
    if paths:
        import pyarrow.dataset as ds

        dataset = ds.dataset(paths, schema=STEP_SCHEMA, format="parquet", filesystem=storage.fs)
        tables.append(dataset.to_table())
        metadata.update(decode_metadata(pq.read_schema(paths[0], filesystem=storage.fs)))
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


# --------------------------------------------------------------------------- TensorBoard

TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "cooled_val_loss": "loss/val_cooled",
    "eval_train_loss": "loss/train_eval",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_sec": "perf/tokens_per_sec",
    "step_time_ms": "perf/step_time_ms",
    "mfu": "perf/mfu",
    "hellaswag_acc_norm": "eval/hellaswag_acc_norm",
}
# Row keys holding text (not step columns: TensorBoard only), under the text plugin.
TENSORBOARD_TEXT_TAGS = {"sample": "samples"}


def tensorboard_file_name(first: int, last: int) -> str:
    # TensorBoard reads every file whose name holds "tfevents", in name order:
    # zero-padded steps keep that order the training order.
    return f"events.out.tfevents.{first:012d}-{last:012d}.raygpt"


def write_tensorboard_part(storage: Storage, logdir: str, rows: list[dict[str, Any]]) -> None:
    """The rows' scalars as one new event file in `logdir` (written locally, then stored).

    One event per step carrying all its scalars, written with TensorBoard's own
    event-file writer: a tenth of the work of one `add_scalar` call per value.
    """
    if not rows:
        return
    import time as _time

    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    steps = [int(r["step"]) for r in rows]
    with tempfile.TemporaryDirectory(prefix="raygpt-tb-") as tmp:
        writer = EventFileWriter(tmp, max_queue_size=len(rows) + 1)
        # Each step's wall time, counted back from now by the steps' own durations.
        wall = _time.time()
        wall_times = []
        for row in reversed(rows):
            wall_times.append(wall)
            wall -= (row.get("step_time_ms") or 0.0) / 1000
        for row, now in zip(rows, reversed(wall_times), strict=True):
            values = [
                summary_pb2.Summary.Value(tag=tag, simple_value=float(row[key]))
                for key, tag in TENSORBOARD_TAGS.items()
                if row.get(key) is not None
            ]
            values += [
                _text_value(tag, row[key])
                for key, tag in TENSORBOARD_TEXT_TAGS.items()
                if row.get(key)
            ]
            writer.add_event(
                event_pb2.Event(
                    step=int(row["step"]), wall_time=now, summary=summary_pb2.Summary(value=values)
                )
            )
        writer.close()
        (event_file,) = Path(tmp).glob("events.out.tfevents.*")
        storage.upload_file(event_file, f"{logdir}/{tensorboard_file_name(min(steps), max(steps))}")


def _text_value(tag: str, text: str):
    """A text-plugin summary value. TensorBoard renders text as Markdown: indented four
    spaces, the text is a code block, its newlines and spacing shown as written."""
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    block = "\n".join("    " + line for line in text.split("\n"))
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        ),
        tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[block.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        ),
    )
