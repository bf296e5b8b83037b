"""raygpt.data.hub_corpora, offline only: the corpus registry, OpenWebText's tar-of-xz-tars
conversion to Parquet (built locally), reuse of converted files and one-line hub errors."""

from __future__ import annotations

import io
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import one_line

from raygpt.data import hub_corpora
from raygpt.errors import UserError


def _inner_xz(docs: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in docs.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _subset_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


A = {"b.txt": "  second doc\n\n\n\n\nafter a gap  \n", "a.txt": "first doc\n\n\nline"}
B = {"c.txt": "third, caf\u00e9 \u2603\n"}


def _texts(path) -> list[str]:
    table = pq.read_table(path)
    assert table.schema.names == ["text"]
    return table.column("text").to_pylist()


def test_registry():
    assert set(hub_corpora.CORPORA) == {"fineweb_edu", "openwebtext"}
    for name, spec in hub_corpora.CORPORA.items():
        assert spec.name == name
        assert 0 < spec.val_fraction < 0.01
        assert callable(spec.fetch) and spec.description
    assert hub_corpora.CORPORA["openwebtext"].fetch is hub_corpora.fetch_openwebtext
    assert hub_corpora.CORPORA["fineweb_edu"].fetch is hub_corpora.fetch_fineweb_edu


def test_openwebtext_tar_becomes_one_parquet_file_in_name_order(tmp_path):
    tar_path = tmp_path / "urlsf_subset00.tar"
    # Members stored out of order, plus a file that is not an .xz: skipped.
    _subset_tar(
        tar_path,
        [("z/2.xz", _inner_xz(B)), ("README", b"not a subset"), ("z/1.xz", _inner_xz(A))],
    )
    target = tmp_path / "parquet" / "urlsf_subset00.parquet"
    hub_corpora._openwebtext_tar_to_parquet(tar_path, target)
    # 1.xz before 2.xz, a.txt before b.txt; 3+ newlines become 2; stripped.
    assert _texts(target) == [
        "first doc\n\nline",
        "second doc\n\nafter a gap",
        "third, caf\u00e9 \u2603",
    ]
    assert sorted(p.name for p in target.parent.iterdir()) == ["urlsf_subset00.parquet"]


def test_the_conversion_is_the_same_whatever_the_tars_order(tmp_path):
    one, two = tmp_path / "one.tar", tmp_path / "two.tar"
    _subset_tar(one, [("1.xz", _inner_xz(A)), ("2.xz", _inner_xz(B))])
    _subset_tar(two, [("2.xz", _inner_xz(B)), ("1.xz", _inner_xz(dict(reversed(A.items()))))])
    hub_corpora._openwebtext_tar_to_parquet(one, tmp_path / "one.parquet")
    hub_corpora._openwebtext_tar_to_parquet(two, tmp_path / "two.parquet")
    assert _texts(tmp_path / "one.parquet") == _texts(tmp_path / "two.parquet")


def test_a_broken_tar_leaves_no_target_and_no_temporary(tmp_path):
    bad = tmp_path / "bad.tar"
    _subset_tar(bad, [("1.xz", b"this is not xz data at all")])
    target = tmp_path / "out" / "x.parquet"
    with pytest.raises(tarfile.TarError):
        hub_corpora._openwebtext_tar_to_parquet(bad, target)
    assert list((tmp_path / "out").iterdir()) == []


def test_converted_subsets_are_reused_without_downloading(tmp_path):
    # Every subset already converted: the 21 paths come back in order and the hub is
    # never asked (there is no network here: a download would fail the test).
    folder = tmp_path / "downloads" / "openwebtext" / "parquet"
    folder.mkdir(parents=True)
    tar_path = tmp_path / "s.tar"
    _subset_tar(tar_path, [("1.xz", _inner_xz(B))])
    for i in range(hub_corpora.OPENWEBTEXT_SUBSETS):
        hub_corpora._openwebtext_tar_to_parquet(tar_path, folder / f"urlsf_subset{i:02d}.parquet")
    paths = hub_corpora.fetch_openwebtext(tmp_path)
    assert paths == [
        str(folder / f"urlsf_subset{i:02d}.parquet") for i in range(hub_corpora.OPENWEBTEXT_SUBSETS)
    ]
    assert _texts(paths[-1]) == ["third, caf\u00e9 \u2603"]


def test_hub_errors_are_one_line_and_say_what_to_do():
    err = hub_corpora._hub_error("Skylion007/openwebtext", OSError("timed out\nafter 10 s"))
    assert isinstance(err, UserError)
    with pytest.raises(UserError) as info:
        raise err
    text = one_line(info)
    assert "Skylion007/openwebtext (timed out after 10 s)" in text
    assert "HF_ENDPOINT" in text and "--input" in text
