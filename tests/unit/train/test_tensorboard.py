"""raygpt.train.tensorboard: event files that TensorBoard's own reader reads back with the
right tags, steps, values, wall times, text samples and HParams; resumed runs' drops."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from raygpt import storage
from raygpt.train import tensorboard


@pytest.fixture
def store(tmp_path):
    return storage.resolve(str(tmp_path), check=False)


def _rows():
    return [
        {"step": 1, "train_loss": 4.5, "lr": 1e-4, "grad_norm": 2.0, "step_time_ms": 500.0},
        {"step": 2, "train_loss": 4.0, "lr": 2e-4, "grad_norm": 1.5, "step_time_ms": 250.0},
        {
            "step": 3,
            "train_loss": 3.5,
            "lr": 3e-4,
            "grad_norm": 1.0,
            "step_time_ms": 250.0,
            "tokens_per_sec": 1234.0,
            "val_loss": 3.75,
            "best_val_loss": 3.75,
            "eval_train_loss": None,  # None is left out, not written as 0
            "sample": "def f():\n  return 1",
            "run": "not a scalar",  # keys outside TAGS are ignored
        },
    ]


def _load(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_file_names_sort_in_training_order():
    assert tensorboard.file_name(1, 30) == "events.out.tfevents.000000000001-000000000030.raygpt"
    names = [tensorboard.file_name(a, b) for a, b in [(1, 9), (10, 99), (100, 1000)]]
    assert names == sorted(names)
    # TensorBoard reads every file with "tfevents" in its name; drop_after's pattern too.
    assert all(tensorboard._EVENTS_RE.match(n) for n in names)


def test_write_part_scalars_read_back_by_tensorboard(store, tmp_path):
    tensorboard.write_part(store, store.path("tb"), _rows())
    files = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert files == [tensorboard.file_name(1, 3)]  # one file per part, named by its steps
    acc = _load(tmp_path / "tb")
    scalars = set(acc.Tags()["scalars"])
    assert scalars == {
        "loss/train",
        "optim/lr",
        "optim/grad_norm",
        "perf/step_time_ms",
        "perf/tokens_per_sec",
        "loss/val",
        "loss/val_best",
    }
    train = acc.Scalars("loss/train")
    assert [e.step for e in train] == [1, 2, 3]
    assert [e.value for e in train] == pytest.approx([4.5, 4.0, 3.5])
    assert [(e.step, e.value) for e in acc.Scalars("loss/val")] == [(3, 3.75)]
    assert acc.Scalars("optim/lr")[0].value == pytest.approx(1e-4)
    # Wall times counted back by the steps' own durations: 0.25 s between steps 2 and 3.
    walls = [e.wall_time for e in train]
    assert walls == sorted(walls)
    assert walls[2] - walls[1] == pytest.approx(0.25, abs=1e-3)
    assert walls[1] - walls[0] == pytest.approx(0.25, abs=1e-3)


def test_samples_are_text_as_a_markdown_code_block(store, tmp_path):
    tensorboard.write_part(store, store.path("tb"), _rows())
    acc = _load(tmp_path / "tb")
    assert acc.Tags()["tensors"] == ["samples"]
    (event,) = acc.Tensors("samples")
    assert event.step == 3
    text = event.tensor_proto.string_val[0].decode()
    assert text == "    def f():\n      return 1"
    assert acc.SummaryMetadata("samples").plugin_data.plugin_name == "text"


def test_no_rows_writes_nothing(store, tmp_path):
    tensorboard.write_part(store, store.path("tb"), [])
    assert not (tmp_path / "tb").exists()


def test_hparams_file_names_the_trials_values_and_metrics(store, tmp_path):
    hparams = {"optimizer": "adamw", "learning_rate": 3e-3, "nesterov": True, "betas": (0.9, 0.95)}
    tensorboard.write_hparams(store, store.path("tb"), hparams)
    assert [p.name for p in (tmp_path / "tb").iterdir()] == [tensorboard.HPARAMS_FILE]
    acc = _load(tmp_path / "tb")
    content = acc.PluginTagToContent("hparams")
    start = next(
        plugin_data_pb2.HParamsPluginData.FromString(blob).session_start_info
        for blob in content.values()
        if plugin_data_pb2.HParamsPluginData.FromString(blob).HasField("session_start_info")
    )
    values = start.hparams
    assert values["optimizer"].string_value == "adamw"
    assert values["learning_rate"].number_value == pytest.approx(3e-3)
    # torch's hparams() writes a bool as the number 1 (bool is an int); either form is true.
    assert values["nesterov"].bool_value or values["nesterov"].number_value == 1
    assert values["betas"].string_value == "(0.9, 0.95)"  # not a scalar: shown as text
    # The session also ends, so TensorBoard does not show the trial as running forever.
    assert any(
        plugin_data_pb2.HParamsPluginData.FromString(blob).HasField("session_end_info")
        for blob in content.values()
    )


def test_drop_after_removes_later_parts_and_keeps_hparams(store, tmp_path):
    logdir = store.path("tb")
    for first, last in [(1, 6), (7, 12), (13, 18)]:
        rows = [{"step": s, "train_loss": 1.0} for s in range(first, last + 1)]
        tensorboard.write_part(store, logdir, rows)
    tensorboard.write_hparams(store, logdir, {"optimizer": "sgd"})
    assert tensorboard.drop_after(store, logdir, 12) == 1
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted(
        [tensorboard.file_name(1, 6), tensorboard.file_name(7, 12), tensorboard.HPARAMS_FILE]
    )
    # A resume from step 6 drops the part starting at 7; the reader sees steps 1..6 only.
    assert tensorboard.drop_after(store, logdir, 6) == 1
    assert [e.step for e in _load(tmp_path / "tb").Scalars("loss/train")] == list(range(1, 7))
    assert tensorboard.drop_after(store, logdir, 6) == 0
