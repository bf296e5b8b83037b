"""The large named corpora (fineweb_edu, openwebtext): fetched from the Hugging Face Hub
as Parquet files and tokenized across the Ray cluster by corpus.prepare_corpus."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygpt.data.common import one_line
from raygpt.errors import UserError


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus too large to tokenize in one process: fetched as Parquet files (each with
    a `text` column) and prepared by prepare_corpus across the Ray cluster."""

    name: str
    description: str
    fetch: Callable[[Path], list[str]]  # the cache root -> local Parquet paths
    val_fraction: float  # of documents, by content hash


FINEWEB_EDU_REPO = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_FILES = "sample/10BT/*.parquet"
OPENWEBTEXT_REPO = "Skylion007/openwebtext"
OPENWEBTEXT_SUBSETS = 21  # subsets/urlsf_subset00.tar .. urlsf_subset20.tar


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise UserError(
            "downloading a named corpus needs huggingface_hub: pip install 'raygpt[corpora]' "
            "(or prepare local files with --input PATH)"
        ) from exc
    return huggingface_hub


def _hub_error(repo: str, exc: BaseException) -> UserError:
    return UserError(
        f"could not download from the Hugging Face dataset {repo} ({one_line(exc)}); check the "
        "network (HF_ENDPOINT, HF_TOKEN), or download the files elsewhere and pass --input"
    )


def fetch_fineweb_edu(root: Path) -> list[str]:
    """FineWeb-Edu sample-10BT's Parquet files, downloaded once (huggingface_hub resumes
    and skips files already complete)."""
    dest = root / "downloads" / "fineweb_edu"
    try:
        _hub().snapshot_download(
            repo_id=FINEWEB_EDU_REPO,
            repo_type="dataset",
            allow_patterns=[FINEWEB_EDU_FILES],
            local_dir=str(dest),
        )
    except UserError:
        raise
    except Exception as exc:  # the hub's errors are many and version-dependent
        raise _hub_error(FINEWEB_EDU_REPO, exc) from exc
    files = sorted(str(p) for p in dest.glob(FINEWEB_EDU_FILES))
    if not files:
        raise UserError(f"no {FINEWEB_EDU_FILES} files arrived from {FINEWEB_EDU_REPO} in {dest}")
    return files


def fetch_openwebtext(root: Path) -> list[str]:
    """OpenWebText as 21 Parquet files, one per subset tar, each converted once.

    The dataset has no Parquet files of its own (Hugging Face converts only its first
    5 GB) and `datasets` 4+ no longer runs its loading script, so the tars are read
    here the way that script reads them.
    """
    hub = _hub()
    dest = root / "downloads" / "openwebtext"
    out = []
    for i in range(OPENWEBTEXT_SUBSETS):
        target = dest / "parquet" / f"urlsf_subset{i:02d}.parquet"
        if not target.is_file():
            name = f"subsets/urlsf_subset{i:02d}.tar"
            try:
                tar_path = hub.hf_hub_download(
                    repo_id=OPENWEBTEXT_REPO,
                    filename=name,
                    repo_type="dataset",
                    local_dir=str(dest),
                )
            except Exception as exc:  # the hub's errors are many and version-dependent
                raise _hub_error(OPENWEBTEXT_REPO, exc) from exc
            _openwebtext_tar_to_parquet(Path(tar_path), target)
            Path(tar_path).unlink()  # 600 MB each; the Parquet file replaces it
        out.append(str(target))
    return out


def _name(member: Any) -> str:
    return member.name


def _openwebtext_tar_to_parquet(tar_path: Path, target: Path) -> None:
    """One subset tar (of .xz tars of .txt documents) -> one Parquet file, atomically.

    As the Hugging Face script: each .txt is a document, runs of 3+ newlines become
    2, and the text is stripped. Members are read in name order, so the file is the
    same on every machine.
    """
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    schema = pa.schema([("text", pa.string())])
    try:
        with tarfile.open(tar_path) as outer, pq.ParquetWriter(tmp, schema) as writer:
            xzs = sorted((m for m in outer.getmembers() if m.name.endswith(".xz")), key=_name)
            for member in xzs:
                # Each .xz is itself a tar (of .txt files), read as a stream.
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|xz") as inner:
                    docs = sorted(
                        (m.name, inner.extractfile(m).read()) for m in inner if m.isfile()
                    )
                texts = [re.sub("\n\n\n+", "\n\n", raw.decode("utf-8")).strip() for _, raw in docs]
                writer.write_table(pa.table({"text": texts}, schema=schema))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


CORPORA: dict[str, CorpusSpec] = {
    spec.name: spec
    for spec in (
        CorpusSpec(
            "fineweb_edu",
            "FineWeb-Edu sample-10BT, ~10B GPT-2 tokens (downloads ~27 GB of Parquet once)",
            fetch_fineweb_edu,
            val_fraction=0.005,  # ~50M tokens, half llm.c's 100M-token val shard
        ),
        CorpusSpec(
            "openwebtext",
            "OpenWebText, ~9B GPT-2 tokens (downloads ~13 GB once)",
            fetch_openwebtext,
            val_fraction=0.0005,  # nanoGPT's test_size
        ),
    )
}
