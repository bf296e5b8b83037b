"""A large corpus's input files: listing, work units, and the documents of one unit.

Inputs are local or object-store (s3://, gs://) files, folders or globs of

* Parquet, with a text column (``--text-column``, default ``text``);
* JSONL, one JSON object per line with a text field of the same name;
* plain text, one document per line (as Ray Data's ``read_text`` reads it), so a
  document with newlines in it belongs in JSONL or Parquet.

JSONL and text may be compressed (.gz, .zst, .bz2); such a file cannot be split,
so it is one unit.

Work units are derived from the listing alone: Parquet row groups, grouped to about
`unit_bytes` of text, and newline-aligned byte ranges of `unit_bytes` (a range owns
every line that starts in it). They never depend on how many workers run, or on
Ray's block sizes, which is what makes the output the same however it was run.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from raygpt.data.common import one_line
from raygpt.errors import UserError

FORMATS = ("parquet", "jsonl", "text")
_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".txt": "text",
    ".text": "text",
}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
_GLOB = set("*?[")
# A read step, tokenized at once: small, because tiktoken returns Python lists (a GPT-2
# token costs ~36 bytes there, 1 MB of text ~9 MB).
READ_BYTES = 2 << 20  # JSONL/text, in whole lines
PARQUET_ROWS = 256  # ~1 MB of web text
PARQUET_BUFFER = 1 << 20  # stream a row group's pages instead of reading it whole


@dataclass(frozen=True)
class InputFile:
    store: str  # Storage URI of the filesystem the file is on (rebuilt on workers)
    path: str  # path inside that filesystem
    display: str  # as people write it
    size: int
    mtime_ns: int
    format: str
    compression: str | None


def _split_query(pattern: str) -> tuple[str, str]:
    if "://" in pattern and "?" in pattern:
        body, query = pattern.split("?", 1)
        return body, f"?{query}"
    return pattern, ""


def _format_of(name: str, forced: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name; format None when the name does not say."""
    lower = name.lower()
    compression = None
    for suffix, codec in _COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = codec, lower[: -len(suffix)]
    if forced != "auto":
        return forced, compression
    for suffix, fmt in _SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt, compression
    return None, compression


def list_inputs(patterns: list[str], input_format: str = "auto") -> list[InputFile]:
    """Every input file, sorted and without duplicates; UserError when one pattern
    matches nothing or a file's format cannot be told."""
    import pyarrow.fs as pafs

    from raygpt import storage

    if input_format not in ("auto", *FORMATS):
        raise UserError(f"unknown input format {input_format!r}; use auto, {', '.join(FORMATS)}")
    if not patterns:
        raise UserError("no --input given; pass files, folders or globs of Parquet/JSONL/text")
    found: dict[tuple[str, str, str], InputFile] = {}
    for pattern in patterns:
        body, query = _split_query(pattern)
        parts = body.split("/")
        first_glob = next((i for i, p in enumerate(parts) if _GLOB & set(p)), None)
        base = "/".join(parts[:first_glob]) if first_glob is not None else body
        if first_glob is not None and not base:
            base = "."
        try:
            store = storage.resolve(base + query, check=False)
        except UserError as exc:
            raise UserError(f"--input {pattern}: {exc}") from None
        try:
            info = store.fs.get_file_info(store.root)
            if first_glob is None and info.type == pafs.FileType.File:
                infos = [info]
            elif info.type == pafs.FileType.Directory:
                selector = pafs.FileSelector(store.root, recursive=True)
                infos = [
                    i for i in store.fs.get_file_info(selector) if i.type == pafs.FileType.File
                ]
                if first_glob is not None:
                    glob = store.root.rstrip("/") + "/" + "/".join(parts[first_glob:])
                    infos = [i for i in infos if fnmatch.fnmatchcase(i.path, glob)]
                else:
                    hidden = ("_", ".")  # Parquet writers' _SUCCESS, .crc and friends
                    infos = [i for i in infos if not i.base_name.startswith(hidden)]
                    infos = [i for i in infos if _format_of(i.base_name, input_format)[0]]
            else:
                infos = []
        except OSError as exc:
            raise UserError(f"cannot list --input {pattern} ({one_line(exc)})") from None
        if not infos:
            raise UserError(
                f"--input {pattern} matches no files; give Parquet, JSONL or text files, "
                "a folder of them, or a glob"
            )
        for i in infos:
            fmt, compression = _format_of(i.base_name, input_format)
            shown = store.display(i.path)
            if fmt is None:
                raise UserError(
                    f"cannot tell the format of {shown} from its name; pass --format "
                    f"{'|'.join(FORMATS)}"
                )
            if fmt == "parquet" and compression:
                raise UserError(f"{shown}: a Parquet file compresses itself; give it unwrapped")
            # Keyed by filesystem and path, not by store: a file named directly and the
            # folder holding it are two stores of one file.
            scheme = body.partition("://")[0] if "://" in body else "file"
            found[(scheme, query, i.path)] = InputFile(
                store.uri, i.path, shown, int(i.size), int(i.mtime_ns or 0), fmt, compression
            )
    return [found[k] for k in sorted(found, key=lambda k: (found[k].display, k))]


def _filesystem(uri: str, cache: dict[str, Any] = {}) -> Any:  # noqa: B006 - per-process cache
    if uri not in cache:
        from raygpt import storage

        cache[uri] = storage.resolve(uri, check=False).fs
    return cache[uri]


def _parquet_text_column(pf: Any, text_column: str, where: str) -> int:
    """The Parquet column index of the text column; UserError if it is missing or not text."""
    import pyarrow as pa

    schema = pf.schema_arrow
    if text_column not in schema.names:
        raise UserError(
            f"{where} has no {text_column!r} column (its columns: {', '.join(schema.names)}); "
            "pass --text-column NAME"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):  # fmt: skip
        raise UserError(f"{where}: column {text_column!r} holds {kind}, not text")
    paths = [pf.metadata.schema.column(j).path for j in range(pf.metadata.num_columns)]
    return paths.index(text_column)


def plan_units(files: list[InputFile], unit_bytes: int, text_column: str) -> list[dict[str, Any]]:
    """The work units of the corpus, in order: each a dict that JSON carries to a worker.

    Reads Parquet footers only, so a missing text column fails here, before anything
    is written. A unit: {index, file (InputFile fields), start, stop}, where start/stop
    are row groups (Parquet) or byte offsets (JSONL, text).
    """
    import pyarrow.parquet as pq

    units: list[dict[str, Any]] = []
    for f in files:
        spans: list[tuple[int, int]] = []
        if f.format == "parquet":
            try:
                with _filesystem(f.store).open_input_file(f.path) as handle:
                    pf = pq.ParquetFile(handle)
                    col = _parquet_text_column(pf, text_column, f.display)
                    md = pf.metadata
                    start, size = 0, 0
                    for g in range(md.num_row_groups):
                        size += md.row_group(g).column(col).total_uncompressed_size
                        if size >= unit_bytes:
                            spans.append((start, g + 1))
                            start, size = g + 1, 0
                    if start < md.num_row_groups:
                        spans.append((start, md.num_row_groups))
                    spans = [
                        (a, b)
                        for a, b in spans
                        if sum(md.row_group(g).num_rows for g in range(a, b))
                    ]
            except UserError:
                raise
            except Exception as exc:  # pyarrow's ArrowInvalid, OSError: not a Parquet file
                raise UserError(f"cannot read {f.display} as Parquet ({one_line(exc)})") from None
        elif f.compression:
            spans = [(0, f.size)] if f.size else []
        else:
            count = math.ceil(f.size / unit_bytes)
            spans = [(k * unit_bytes, min((k + 1) * unit_bytes, f.size)) for k in range(count)]
        for start, stop in spans:
            units.append({"index": len(units), "file": asdict(f), "start": start, "stop": stop})
    return units


# --------------------------------------------------------------------------- reading


def iter_documents(unit: dict[str, Any], text_column: str) -> Iterator[list[str]]:
    """The unit's documents in file order, in batches; empty documents are left out.
    Bad content (not UTF-8, a missing text, not JSON) is a UserError naming the place."""
    f = InputFile(**unit["file"])
    fs = _filesystem(f.store)
    if f.format == "parquet":
        yield from _parquet_documents(fs, f, unit["start"], unit["stop"], text_column)
        return
    for offset, chunk in _line_chunks(fs, f, unit["start"], unit["stop"]):
        if f.format == "jsonl":
            texts = _jsonl_texts(chunk, offset, f, text_column)
        else:
            texts = _text_lines(chunk, offset, f)
        if texts:
            yield texts


def _where(f: InputFile, offset: int) -> str:
    if f.compression:
        return f"{f.display} (byte {offset} after decompression)"
    return f"{f.display} (byte {offset})"


def _parquet_documents(
    fs: Any, f: InputFile, start: int, stop: int, text_column: str
) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    with fs.open_input_file(f.path) as handle:
        pf = pq.ParquetFile(handle, buffer_size=PARQUET_BUFFER, pre_buffer=False)
        _parquet_text_column(pf, text_column, f.display)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
        batches = pf.iter_batches(
            batch_size=PARQUET_ROWS,
            row_groups=list(range(start, stop)),
            columns=[text_column],
            use_threads=False,
        )
        for batch in batches:
            texts = _arrow_texts(batch.column(0), f.display, row, text_column)
            row += batch.num_rows
            if texts:
                yield texts


def _arrow_texts(arr: Any, where: str, first_row: int, text_column: str) -> list[str]:
    """Non-empty texts of an Arrow string/binary array (rows first_row.. of a file),
    UTF-8 checked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if arr.null_count:
        first = pc.index(pc.is_null(arr), True).as_py()
        raise UserError(f"{where}: row {first_row + first} has no {text_column!r} (null)")
    try:
        if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
            arr = arr.cast(pa.large_string())
        else:
            arr.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise UserError(
            f"{where}: rows {first_row}..{first_row + len(arr) - 1} hold text that is not valid "
            f"UTF-8 ({one_line(exc)}); convert it to UTF-8"
        ) from None
    return [t for t in arr.to_pylist() if t]


def _line_chunks(fs: Any, f: InputFile, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes of whole lines) covering the lines that start in [start, stop)."""
    if f.compression:
        with fs.open_input_stream(f.path, compression=f.compression) as stream:
            offset, carry = 0, b""
            while block := stream.read(READ_BYTES):
                data = carry + block
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield offset, data[:cut]
                    offset += cut
                carry = data[cut:]
            if carry:
                yield offset, carry
        return
    with fs.open_input_file(f.path) as handle:
        pos = _first_line_start(handle, start, f.size)
        block = READ_BYTES
        while pos < stop and pos < f.size:
            data = handle.read_at(block, pos)
            cut = data.rfind(b"\n") + 1
            if not cut:
                if pos + len(data) < f.size:
                    block *= 2  # one line longer than the block: read more
                    continue
                cut = len(data)  # the last line, with no newline after it
            chunk = data[:cut]
            if pos + len(chunk) > stop:
                # Keep the line holding byte stop-1 (it starts before stop), not the rest.
                end = chunk.find(b"\n", stop - 1 - pos)
                chunk = chunk[: end + 1] if end >= 0 else chunk
            yield pos, chunk
            pos += len(chunk)
            block = READ_BYTES


def _first_line_start(handle: Any, start: int, size: int) -> int:
    """Offset of the first line that starts at or after `start`."""
    if start == 0:
        return 0
    pos = start - 1  # a newline at start-1 means a line starts exactly at start
    while pos < size:
        data = handle.read_at(1 << 16, pos)
        found = data.find(b"\n")
        if found >= 0:
            return pos + found + 1
        pos += len(data)
    return size


def _utf8_error(chunk: bytes, offset: int, f: InputFile) -> UserError:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
    else:  # pragma: no cover - called only for invalid chunks
        at = offset
    return UserError(
        f"{_where(f, at)} is not valid UTF-8 text (bad byte {chunk[at - offset]:#04x}); "
        "convert the file to UTF-8"
    )


def _jsonl_texts(chunk: bytes, offset: int, f: InputFile, text_column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.json as pj

    if not chunk.strip():
        return []
    try:
        pa.array([chunk], pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        raise _utf8_error(chunk, offset, f) from None
    options = pj.ParseOptions(
        explicit_schema=pa.schema([(text_column, pa.large_string())]),
        unexpected_field_behavior="ignore",
    )
    try:
        table = pj.read_json(
            pa.BufferReader(chunk),
            read_options=pj.ReadOptions(use_threads=False, block_size=max(len(chunk), 1 << 20)),
            parse_options=options,
        )
    except pa.ArrowInvalid as exc:
        message = str(exc)
        row = _row_of(message)
        at = _line_offset(chunk, row) if row is not None else 0
        raise UserError(
            f"{_where(f, offset + at)} is not a JSON object with a text field "
            f"{text_column!r} ({one_line(message)})"
        ) from None
    arr = table.column(0).combine_chunks() if table.num_rows else None
    if arr is None:
        return []
    if arr.null_count:
        import pyarrow.compute as pc

        row = pc.index(pc.is_null(arr), True).as_py()
        raise UserError(
            f"{_where(f, offset + _line_offset(chunk, row))}: the JSON line has no "
            f"{text_column!r} field; pass --text-column NAME"
        )
    return [t for t in arr.to_pylist() if t]


def _row_of(message: str) -> int | None:
    import re

    match = re.search(r"in row (\d+)", message)
    return int(match[1]) if match else None


def _line_offset(chunk: bytes, row: int) -> int:
    """Offset in `chunk` of its `row`-th non-blank line (the JSON reader's row numbers)."""
    pos, seen = 0, -1
    for line in chunk.split(b"\n"):
        if line.strip():
            seen += 1
            if seen == row:
                return pos
        pos += len(line) + 1
    return 0


def _text_lines(chunk: bytes, offset: int, f: InputFile) -> list[str]:
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        raise _utf8_error(chunk, offset, f) from None
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
