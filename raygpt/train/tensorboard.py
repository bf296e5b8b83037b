"""TensorBoard event files of a run: rank 0's step rows as scalars (and samples as text),
one file per report beside the step parts, so `tensorboard --logdir` shows every run and
trial under a storage root."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from raygpt import results
from raygpt.storage import Storage

_EVENTS_RE = re.compile(r"^events\.out\.tfevents\.(\d+)-(\d+)\.raygpt$")

TAGS = {
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
    "best_val_loss": "loss/val_best",  # rows at evaluations carry it: TensorBoard only
}
# Row keys holding text (not step columns: TensorBoard only), under the text plugin.
TEXT_TAGS = {"sample": "samples"}


def file_name(first: int, last: int) -> str:
    # TensorBoard reads every file whose name holds "tfevents", in name order:
    # zero-padded steps keep that order the training order.
    return f"events.out.tfevents.{first:012d}-{last:012d}.raygpt"


def write_part(storage: Storage, logdir: str, rows: list[dict[str, Any]]) -> None:
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
                for key, tag in TAGS.items()
                if row.get(key) is not None
            ]
            values += [_text_value(tag, row[key]) for key, tag in TEXT_TAGS.items() if row.get(key)]
            writer.add_event(
                event_pb2.Event(
                    step=int(row["step"]), wall_time=now, summary=summary_pb2.Summary(value=values)
                )
            )
        writer.close()
        (event_file,) = Path(tmp).glob("events.out.tfevents.*")
        storage.upload_file(event_file, f"{logdir}/{file_name(min(steps), max(steps))}")


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


# The metrics TensorBoard's HParams tab shows beside a trial's hyperparameters: each is
# the last value of that scalar tag in the trial's event files.
HPARAMS_METRICS = ("loss/val", "loss/val_best", "loss/train")
HPARAMS_FILE = "events.out.tfevents.hparams.raygpt-hparams"  # not a part: never dropped


def write_hparams(storage: Storage, logdir: str, hparams: dict[str, Any]) -> None:
    """A trial's hyperparameters as HParams summaries in its `logdir`, so TensorBoard's
    HParams tab lists the sweep's trials (one session per trial folder) with their
    optimizer, learning rate and searched keys beside the HPARAMS_METRICS."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    values = {
        k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
    }
    # The session's start and end, without an experiment summary of its own: TensorBoard
    # then builds the experiment from every trial's session, so each trial's keys show.
    _, session_start, session_end = hparams_summaries(values, dict.fromkeys(HPARAMS_METRICS, 0.0))
    with tempfile.TemporaryDirectory(prefix="raygpt-tb-") as tmp:
        writer = EventFileWriter(tmp)
        for summary in (session_start, session_end):
            writer.add_event(event_pb2.Event(step=0, summary=summary))
        writer.close()
        (event_file,) = Path(tmp).glob("events.out.tfevents.*")
        storage.upload_file(event_file, f"{logdir}/{HPARAMS_FILE}")


def drop_after(storage: Storage, logdir: str, step: int) -> int:
    """As results.drop_parts_after, for the event files a resumed run will write again."""
    return results.drop_files_after(storage, logdir, _EVENTS_RE, step)
