"""raygpt.data.inputs: listing a corpus's files, planning work units that never depend on
the worker count, and reading each unit's documents exactly once (local files only)."""

from __future__ import annotations

import gzip
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_line

from raygpt.data import inputs
from raygpt.errors import UserError

LINES = ["first line", "", "a somewhat longer second line of text", "x", "caf\u00e9 \u2603", "end"]


def _all_docs(units, text_column="text") -> list[str]:
    return [t for u in units for batch in inputs.iter_documents(u, text_column) for t in batch]


def _listing(*patterns, fmt="auto"):
    return inputs.list_inputs([str(p) for p in patterns], fmt)


def test_listing_a_folder_by_format_skipping_writer_files(tmp_path):
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"text": ["p"]}), tmp_path / "b.parquet")
    (tmp_path / "sub" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "j"}\n'))
    (tmp_path / "c.txt").write_text("t\n")
    (tmp_path / "d.ZST").write_bytes(b"")  # compressed, format unknown from the name: skipped
    for skipped in ("_SUCCESS", ".c.txt.crc", "README.md"):
        (tmp_path / skipped).write_text("x")
    files = _listing(tmp_path)
    assert [(f.display.removeprefix(str(tmp_path)), f.format, f.compression) for f in files] == [
        ("/b.parquet", "parquet", None),
        ("/c.txt", "text", None),
        ("/sub/a.jsonl.gz", "jsonl", "gzip"),
    ]
    assert files[1].size == 2 and files[1].mtime_ns > 0
    # The same file twice, or by folder and by glob: listed once.
    assert _listing(tmp_path / "c.txt", tmp_path / "c.txt") == _listing(tmp_path / "c.txt")
    assert _listing(tmp_path, f"{tmp_path}/*.txt") == files


def test_a_file_given_by_folder_and_by_name_is_listed_once(tmp_path):
    (tmp_path / "c.txt").write_text("t\n")
    assert len(_listing(tmp_path, tmp_path / "c.txt")) == 1


def test_globs_and_a_forced_format(tmp_path):
    (tmp_path / "a.txt").write_text("1\n")
    (tmp_path / "b.txt").write_text("2\n")
    (tmp_path / "c.data").write_text("3\n")
    assert [f.display for f in _listing(f"{tmp_path}/*.txt")] == [
        f"{tmp_path}/a.txt",
        f"{tmp_path}/b.txt",
    ]
    with pytest.raises(UserError) as err:
        _listing(f"{tmp_path}/*.data")
    assert "cannot tell the format of" in one_line(err) and "--format" in one_line(err)
    (forced,) = _listing(f"{tmp_path}/*.data", fmt="text")
    assert forced.format == "text"


@pytest.mark.parametrize(
    ("setup", "pattern", "says"),
    [
        (None, "missing/*.txt", "matches no files"),
        (None, "nothing_here.txt", "matches no files"),
        ("x.parquet.gz", "x.parquet.gz", "a Parquet file compresses itself"),
    ],
)
def test_bad_inputs_are_one_line(tmp_path, setup, pattern, says):
    if setup:
        (tmp_path / setup).write_bytes(b"")
    with pytest.raises(UserError) as err:
        _listing(f"{tmp_path}/{pattern}")
    assert says in one_line(err)


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown input format 'csv'"):
        inputs.list_inputs(["x"], "csv")
    with pytest.raises(UserError, match="no --input given"):
        inputs.list_inputs([])


@pytest.mark.parametrize("unit_bytes", [1, 3, 7, 16, 40, 1 << 20])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_byte_ranges_own_every_line_exactly_once(tmp_path, unit_bytes, trailing_newline):
    path = tmp_path / "doc.txt"
    path.write_text("\n".join(LINES) + ("\n" if trailing_newline else ""), encoding="utf-8")
    files = _listing(path)
    units = inputs.plan_units(files, unit_bytes, "text")
    # The ranges tile the file, and depend on nothing but the file and unit_bytes.
    assert [u["index"] for u in units] == list(range(len(units)))
    assert units[0]["start"] == 0 and units[-1]["stop"] == files[0].size
    assert all(a["stop"] == b["start"] for a, b in itertools.pairwise(units))
    assert units == inputs.plan_units(files, unit_bytes, "text")
    assert _all_docs(units) == [line for line in LINES if line]


def test_a_line_longer_than_the_read_block_is_read_whole(tmp_path, monkeypatch):
    # A small read block stands in for a line of more than 2 MB (READ_BYTES).
    monkeypatch.setattr(inputs, "READ_BYTES", 8)
    long = "y" * 50
    path = tmp_path / "long.txt"
    path.write_text(f"short\n{long}\nlast\r\n")
    units = inputs.plan_units(_listing(path), 20, "text")
    assert _all_docs(units) == ["short", long, "last"]  # \r of a CRLF line is dropped


def test_jsonl_plain_and_compressed(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": ""}, {"text": "two\nlines", "extra": [1]}]
    body = "".join(json.dumps(r) + "\n" for r in rows) + "\n"  # a blank line is fine
    (tmp_path / "a.jsonl").write_text(body)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    files = _listing(tmp_path)
    units = inputs.plan_units(files, 16, "text")
    compressed = [u for u in units if u["file"]["compression"]]
    assert len(compressed) == 1  # a compressed file cannot be split
    assert compressed[0]["stop"] == files[1].size
    assert _all_docs(units) == ["one", "two\nlines"] * 2  # empty documents are left out


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"text": "ok"}\n{"body": "no text"}\n', "(byte 15): the JSON line has no 'text' field"),
        (b'{"text": "ok"}\nnot json\n', "(byte 15) is not a JSON object with a text field"),
        (
            b'{"text": "ok"}\n{"text": "\xff"}\n',
            "(byte 25) is not valid UTF-8 text (bad byte 0xff)",
        ),
    ],
)
def test_bad_jsonl_names_the_byte(tmp_path, body, says):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    units = inputs.plan_units(_listing(path), 1 << 20, "text")
    with pytest.raises(UserError) as err:
        _all_docs(units)
    assert f"{path} {says}" in one_line(err)


def test_invalid_utf8_text_names_the_byte(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nbad \xc3\x28 here\n")
    with pytest.raises(UserError) as err:
        _all_docs(inputs.plan_units(_listing(path), 1 << 20, "text"))
    assert one_line(err).startswith(f"{path} (byte 9) is not valid UTF-8 text (bad byte 0xc3)")


def _parquet(path, texts, row_group_size, column="text", kind=None):
    array = pa.array(texts, kind or pa.string())
    pq.write_table(pa.table({column: array}), path, row_group_size=row_group_size)


def test_parquet_row_groups_are_grouped_into_units(tmp_path):
    texts = [f"document number {i:03d} " * 4 for i in range(20)]  # ~100 bytes each
    _parquet(tmp_path / "a.parquet", texts, row_group_size=2)  # 10 row groups
    files = _listing(tmp_path / "a.parquet")
    units = inputs.plan_units(files, 450, "text")
    spans = [(u["start"], u["stop"]) for u in units]
    assert spans[0][0] == 0 and spans[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert 1 < len(units) < 10  # several row groups per unit
    assert _all_docs(units) == texts
    one = inputs.plan_units(files, 1 << 30, "text")
    assert [(u["start"], u["stop"]) for u in one] == [(0, 10)]


def test_parquet_text_column_checks(tmp_path):
    _parquet(tmp_path / "a.parquet", ["x"], 1, column="body")
    files = _listing(tmp_path / "a.parquet")
    with pytest.raises(UserError) as err:
        inputs.plan_units(files, 1 << 20, "text")  # found from the footer, before any read
    assert "has no 'text' column (its columns: body); pass --text-column NAME" in one_line(err)
    assert _all_docs(inputs.plan_units(files, 1 << 20, "body"), "body") == ["x"]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="column 'text' holds int64, not text"):
        inputs.plan_units(_listing(tmp_path / "n.parquet"), 1 << 20, "text")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="as Parquet"):
        inputs.plan_units(_listing(tmp_path / "fake.parquet"), 1 << 20, "text")


def test_parquet_nulls_and_binary_text(tmp_path):
    _parquet(tmp_path / "n.parquet", ["a", "b", None, "d"], 2)
    with pytest.raises(UserError) as err:
        _all_docs(inputs.plan_units(_listing(tmp_path / "n.parquet"), 1 << 20, "text"))
    assert "row 2 has no 'text' (null)" in one_line(err)
    _parquet(tmp_path / "b.parquet", [b"bytes ok", b"", "caf\u00e9".encode()], 2, kind=pa.binary())
    units = inputs.plan_units(_listing(tmp_path / "b.parquet"), 1 << 20, "text")
    assert _all_docs(units) == ["bytes ok", "caf\u00e9"]
    # Row groups are read in batches of PARQUET_ROWS: the error names the batch's rows.
    _parquet(tmp_path / "u.parquet", [b"ok", b"\xff\xfe"], 1, kind=pa.binary())
    with pytest.raises(UserError, match=r"rows 0\.\.1 hold text that is not valid UTF-8"):
        _all_docs(inputs.plan_units(_listing(tmp_path / "u.parquet"), 1 << 20, "text"))
