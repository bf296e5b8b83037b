"""Where results live: a local (or NFS) folder, or an s3:// / gs:// prefix, behind one API.

`resolve(--storage-path)` turns the user's string into a `Storage`: a pyarrow
filesystem plus the root inside it. Every file raygpt writes goes through it, so
the same code writes to a laptop's disk, a shared NFS mount or a bucket.

Two promises, both checked before any Ray work starts:

- `resolve(path)` proves, within seconds, that this machine can write there. Bad
  input (a file, an unwritable folder, an unreachable endpoint, denied
  credentials, a missing bucket) is one line naming the bad value, and it leaves
  nothing written anywhere.
- `cluster.storage_check.preflight(storage)` proves that every node of the Ray
  cluster sees the same storage.

`Storage` pickles (pyarrow filesystems do), so Ray ships it to workers as is.
Give Ray the pair `storage_path=storage.root, storage_filesystem=storage.fs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import pyarrow.fs as pafs

from raygpt import object_store
from raygpt.errors import UserError, first_line
from raygpt.redact import redact

ACCEPTED = "a folder path, file:///PATH, s3://BUCKET/PATH or gs://BUCKET/PATH"
_PROBE_PREFIX = ".raygpt-probe-"


@dataclass(frozen=True)
class Storage:
    """A pyarrow filesystem and the root of raygpt's results inside it.

    Paths given to and returned by the methods are filesystem paths ("fs paths"):
    "/abs/results/run" on a local disk, "bucket/prefix/run" on an object store.
    Build them with `path()`; show them to people with `display()`.
    """

    uri: str  # normalised: "/abs/path", or "s3://bucket/prefix?endpoint_override=..."
    fs: pafs.FileSystem
    root: str  # the root inside fs: "/abs/path" or "bucket/prefix"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The fs path of `parts` under the root ("a/b" parts are fine)."""
        tail = [p.strip("/") for p in parts if p.strip("/")]
        return "/".join([self.root.rstrip("/") or "", *tail]) if tail else self.root

    def at(self, fs_path: str) -> Storage:
        """The same filesystem rooted at `fs_path` (a run or sweep folder inside it)."""
        return dataclasses.replace(self, root=fs_path.rstrip("/") or fs_path)

    def display(self, fs_path: str | None = None) -> str:
        """`fs_path` (default: the root) as people write it: a path or s3://bucket/key."""
        fs_path = self.root if fs_path is None else fs_path
        if self.is_local:
            return fs_path
        return f"{self.uri.split('://', 1)[0]}://{fs_path}"

    def exists(self, fs_path: str) -> bool:
        return self.fs.get_file_info(fs_path).type != pafs.FileType.NotFound

    def is_dir(self, fs_path: str) -> bool:
        return self.fs.get_file_info(fs_path).type == pafs.FileType.Directory

    def highest_missing(self, fs_path: str) -> str | None:
        """The highest folder from `fs_path` up that does not exist (what writing there
        would bring into being); None if `fs_path` exists."""
        if self.exists(fs_path):
            return None
        top = fs_path
        while "/" in top and (parent := top.rsplit("/", 1)[0]) and not self.exists(parent):
            top = parent
        return top

    def list_dir(self, fs_path: str) -> list[str]:
        """Sorted names of the direct children of `fs_path`; [] when it does not exist."""
        selector = pafs.FileSelector(fs_path, allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def read_bytes(self, fs_path: str) -> bytes:
        """The whole file; FileNotFoundError when it does not exist."""
        # compression=None: the bytes as stored; pyarrow would otherwise gunzip a "*.gz"
        # key on read (and gzip it again on write), judging by the name alone.
        with self.fs.open_input_stream(fs_path, compression=None) as stream:
            return stream.read()

    def write_bytes(self, fs_path: str, data: bytes) -> None:
        """Replace `fs_path` with `data`, atomically: readers see the old or the new file.

        On a local disk: a temp file in the same folder, then a rename (parents are
        created). On an object store the object appears whole or not at all already
        (one PUT; a multipart upload, for a large file, completes in one step).
        """
        if not self.is_local:
            with self.fs.open_output_stream(fs_path, compression=None) as stream:
                stream.write(data)
            return

        def write(tmp: str) -> None:
            # O_EXCL and mode 0o666: a fresh file with the umask's permissions (mkstemp
            # would make results readable by their owner only).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # the rename must not expose a file still in cache

        _replace_locally(fs_path, write)

    def delete_file(self, fs_path: str) -> None:
        """Delete one file; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(fs_path)

    def delete_dir(self, fs_path: str) -> None:
        """Delete a folder and everything in it; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(fs_path)

    def upload_file(self, local_path: str | Path, fs_path: str) -> None:
        """Copy a local file to `fs_path` (atomically on a local disk, like write_bytes)."""
        if self.is_local:
            _replace_locally(fs_path, lambda tmp: shutil.copyfile(local_path, tmp))
            return
        pafs.copy_files(
            str(local_path),
            fs_path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def upload_dir(self, local_dir: str | Path, fs_path: str) -> None:
        """Copy a local folder to `fs_path`, recursively.

        On a local disk it is copied beside the target and renamed into place, so a
        crash mid-copy never leaves a half folder under the final name. Object stores
        have no folder rename; there each file lands whole (one PUT or a multipart
        upload that completes or does not exist), and readers check the files.
        """
        if self.is_local:
            target = Path(fs_path)
            tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local_dir, tmp)
            try:
                if target.exists():
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        pafs.copy_files(
            str(local_dir),
            fs_path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def download_dir(self, fs_path: str, local_dir: str | Path) -> None:
        """Copy the folder `fs_path`, recursively, into `local_dir` (created if needed)."""
        if not self.is_dir(fs_path):
            raise FileNotFoundError(f"no folder {self.display(fs_path)}")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            fs_path,
            str(local_dir),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )


def _replace_locally(fs_path: str, write: Callable[[str], object]) -> None:
    """Run `write(tmp)` on a temp name beside `fs_path`, then rename it into place."""
    folder = os.path.dirname(fs_path) or "."
    os.makedirs(folder, exist_ok=True)
    # Hidden and unique, so readers listing the folder and concurrent writers never
    # pick it up; removed if anything fails.
    tmp = os.path.join(folder, f".{os.path.basename(fs_path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, fs_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------
# resolve


def resolve(storage_path: str, check: bool = True) -> Storage:
    """The `Storage` that `--storage-path` names; with `check`, proof that it is usable.

    Local: the absolute path. check: it (or the nearest folder above it that
    exists) is a writable folder. Nothing is created.
    s3:// and gs://: the URI's query string holds the filesystem options
    (endpoint_override, scheme, region, ...) and stays in `uri`, so that Ray
    workers and later commands rebuild the same endpoint. check: the bucket
    exists and a probe object can be written, read back and deleted under the
    root, within seconds. The probe is always removed.
    """
    raw = str(storage_path).strip()
    try:
        return _resolve(raw, check)
    except UserError as err:
        # The lines below name the value as given: a password or a key in it stays out.
        shown = redact(str(err))
        if shown == str(err):
            raise
        raise UserError(shown) from None


def _resolve(raw: str, check: bool) -> Storage:
    if not raw:
        raise UserError(f"--storage-path is empty; give {ACCEPTED}")
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if not scheme:
        for known in ("s3", "gs", "gcs", "file"):
            if raw.lower().startswith(f"{known}:"):
                # Both forms come from the corrected one: redact() finds a userinfo only
                # after a '://'.
                fixed = redact(f"{known}://{raw.split(':', 1)[1].lstrip('/')}")
                raise UserError(
                    f"--storage-path {known}:{fixed.split('://', 1)[1]} is missing '//' after "
                    f"'{known}:'; write it as {fixed}"
                )
        return _resolve_local(raw, raw, check)
    if scheme == "file":
        parts = urlsplit(raw)
        if parts.netloc not in ("", "localhost") or parts.query:
            raise UserError(
                f"--storage-path {raw} is not a local file URI; write file:///ABSOLUTE/PATH"
            )
        return _resolve_local(raw, unquote(parts.path), check)
    if scheme in ("s3", "gs", "gcs"):
        return _resolve_object_store(raw, "gs" if scheme == "gcs" else scheme, check)
    raise UserError(
        f"--storage-path {raw} uses the unsupported scheme '{scheme}://'; give {ACCEPTED}"
    )


def _resolve_local(raw: str, path_str: str, check: bool) -> Storage:
    try:
        path = Path(path_str).expanduser().resolve()
        if check:
            _check_local(raw, path)
    except (RuntimeError, OSError) as err:  # ~nosuchuser, a folder we may not look into
        raise UserError(
            f"--storage-path {raw} cannot be used ({err}); give a folder path"
        ) from None
    return Storage(uri=str(path), fs=pafs.LocalFileSystem(), root=str(path))


def _check_local(raw: str, path: Path) -> None:
    """Refuse a path that cannot become a writable folder, without creating anything."""
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"--storage-path {raw} is a file, not a folder; give a folder path "
                "(it is created if missing)"
            )
        existing = path
    else:
        existing = next(p for p in path.parents if p.exists())
        if not existing.is_dir():
            raise UserError(
                f"--storage-path {raw} cannot be created: {existing} is a file, not a folder; "
                "give a folder path"
            )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == path else f"cannot be created: {existing} is"
        raise UserError(
            f"--storage-path {raw} {what} not writable by this user; give a folder you can write to"
        )


def _resolve_object_store(raw: str, scheme: str, check: bool) -> Storage:
    parts = urlsplit(raw)
    if "@" in parts.netloc:
        raise UserError(
            f"--storage-path {scheme}://{parts.netloc.rsplit('@', 1)[1]}...: credentials "
            "do not belong in the path, where logs and run records would keep them; "
            + object_store.CREDENTIALS_HINT[scheme]
        )
    bucket = parts.netloc
    if not bucket:
        raise UserError(f"--storage-path {raw} names no bucket; write {scheme}://BUCKET/PATH")
    prefix = "/".join(p for p in parts.path.split("/") if p)
    root = f"{bucket}/{prefix}" if prefix else bucket
    options = object_store.parse_options(raw, scheme, parts.query)
    if check and scheme == "s3" and not options.get("region"):
        region = None if options.get("endpoint_override") else object_store.bucket_region(bucket)
        if region:
            options["region"] = region
    query = urlencode(object_store.query_pairs(options), safe=":/")
    uri = f"{scheme}://{root}" + (f"?{query}" if query else "")
    storage = Storage(uri=uri, fs=object_store.filesystem(scheme, options), root=root)
    if check:
        _check_object_store(storage, object_store.filesystem(scheme, options, quick=True), options)
    return storage


def _check_object_store(storage: Storage, fs: pafs.FileSystem, options: dict[str, Any]) -> None:
    """Prove this machine can use `storage`, leaving nothing behind. UserError if not."""
    quick = Storage(storage.uri, fs, storage.root)
    bucket = storage.root.split("/", 1)[0]
    scheme = storage.uri.split("://", 1)[0]
    endpoint = options.get("endpoint_override") or ("AWS" if scheme == "s3" else "Google Cloud")
    try:
        if not quick.exists(bucket):
            raise UserError(
                f"bucket '{bucket}' does not exist at {endpoint}; create it "
                f"({object_store.MAKE_BUCKET[scheme].format(bucket)}) or fix --storage-path"
            )
        info = fs.get_file_info(storage.root)
        if info.type == pafs.FileType.File:
            raise UserError(
                f"--storage-path {storage.display()} is an object (a file), not a folder; "
                "give a folder path"
            )
        new_top = quick.highest_missing(quick.root)
        probe = quick.path(f"{_PROBE_PREFIX}{uuid.uuid4().hex}")
        token = uuid.uuid4().bytes
        written = False
        try:
            quick.write_bytes(probe, token)
            written = True
            same = quick.read_bytes(probe) == token
            fs.delete_file(probe)  # a run deletes files too: a refusal here is an error
            written = False
            if new_top is not None:
                _remove_markers(quick, new_top)
        finally:
            if written:  # best effort after an error that is already on its way up
                with contextlib.suppress(OSError):
                    quick.delete_file(probe)
                    if new_top is not None:
                        _remove_markers(quick, new_top)
        if not same:
            raise UserError(
                f"{storage.display()} returned other bytes than were just written to it; "
                "check that endpoint_override is an S3-compatible object store"
            )
    except OSError as err:
        raise UserError(explain_os_error(storage, err, endpoint)) from None


def _remove_markers(storage: Storage, top: str) -> None:
    """Remove `top`, which the probe brought into being, if it holds no object.

    pyarrow's delete_file leaves an empty "parent/" marker object so that the parent
    folder still "exists"; without this a failed run would leave one behind. A folder
    whose parent is the bucket goes without a trace. Deeper, pyarrow re-marks the
    parent, which existed already, so listings are unchanged either way.
    """
    selector = pafs.FileSelector(top, allow_not_found=True, recursive=True)
    if all(i.type == pafs.FileType.Directory for i in storage.fs.get_file_info(selector)):
        storage.delete_dir(top)


def explain_os_error(storage: Storage, err: OSError, endpoint: str) -> str:
    """One line for a storage error: what went wrong, and what to do."""
    text = str(err)
    where = storage.display()
    scheme = storage.uri.split("://", 1)[0]
    if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "CURL error", "(UNAVAILABLE")):
        if re.search(r"curlCode: 6\b|CURL error \[6\]|resolve", text):
            how = "host not found"
        elif re.search(r"curlCode: 28\b|CURL error \[28\]|[Tt]imeout|timed out", text):
            how = "timed out"
        elif re.search(r"curlCode: 7\b|CURL error \[7\]|[Rr]efused|Could not connect", text):
            how = "refused"
        else:
            how = "unreachable"
        return (
            f"cannot reach {where} (endpoint {endpoint} {how}); check endpoint_override / network"
        )
    denied = (
        "ACCESS_DENIED",
        "INVALID_ACCESS_KEY_ID",
        "SIGNATURE_DOES_NOT_MATCH",
        "EXPIRED_TOKEN",
        "MISSING_AUTHENTICATION_TOKEN",
        "HTTP status 403",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    )
    if any(s in text for s in denied):
        return (
            f"access to {where} denied: credentials missing or not allowed; "
            + object_store.CREDENTIALS_HINT[scheme]
        )
    if "NO_SUCH_BUCKET" in text:
        bucket = storage.root.split("/", 1)[0]
        return (
            f"bucket '{bucket}' does not exist at {endpoint}; create it "
            f"({object_store.MAKE_BUCKET[scheme].format(bucket)}) or fix --storage-path"
        )
    first = first_line(err)
    first = re.sub(r"\s*\(Request ID: [^)]*\)", "", first)
    return f"cannot use {where}: {first}; check --storage-path and the endpoint"
