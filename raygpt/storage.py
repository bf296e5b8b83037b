"""Where results live: a local (or NFS) folder, or an s3:// / gs:// prefix, behind one API.

`resolve(--storage-path)` turns the user's string into a `Storage`: a pyarrow
filesystem plus the root inside it. Every file raygpt writes goes through it, so
the same code writes to a laptop's disk, a shared NFS mount or a bucket.

Two promises, both checked before any Ray work starts:

- `resolve(path)` proves, within seconds, that this machine can write there. Bad
  input (a file, an unwritable folder, an unreachable endpoint, denied
  credentials, a missing bucket) is one line naming the bad value, and it leaves
  nothing written anywhere.
- `preflight(storage)` proves that every node of the Ray cluster sees the same
  storage. A node-local path on a multi-node cluster would otherwise fail much
  later, on whichever node rank 0 happens to land.

`Storage` pickles (pyarrow filesystems do), so Ray ships it to workers as is.
Give Ray the pair `storage_path=storage.root, storage_filesystem=storage.fs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import pyarrow.fs as pafs

from raygpt.errors import UserError

ACCEPTED = "a folder path, file:///PATH, s3://BUCKET/PATH or gs://BUCKET/PATH"
PREFLIGHT_DIR = ".raygpt-preflight"
_PROBE_PREFIX = ".raygpt-probe-"

# Timeouts of the filesystem a run uses. request_timeout is, on Linux, how long a
# transfer may make no progress at all (curl's low-speed limit), not a cap on a
# whole upload, so a large checkpoint is safe under it.
_CONNECT_S = 5.0
_REQUEST_S = 30.0
# The check in `resolve` uses a stricter copy: a wrong endpoint must fail in
# seconds, not after the SDK's retries with back-off at the run's timeouts.
# Worst case for an endpoint that accepts connections and never answers:
# _CHECK_ATTEMPTS x _CHECK_REQUEST_S.
_CHECK_CONNECT_S = 3.0
_CHECK_REQUEST_S = 5.0
_CHECK_ATTEMPTS = 2
_CHECK_GCS_RETRY_S = 5

# URI query options, by type, passed on to the pyarrow filesystem. A typo is an
# error rather than silently ignored.
_S3_STR = ("endpoint_override", "scheme", "region", "role_arn", "session_name", "external_id")
_S3_STR += ("tls_ca_file_path", "proxy_options")
_S3_BOOL = ("anonymous", "force_virtual_addressing", "allow_bucket_creation")
_S3_BOOL += ("allow_bucket_deletion", "check_directory_existence_before_creation")
_S3_BOOL += ("background_writes", "allow_delayed_open")
_S3_FLOAT = ("connect_timeout", "request_timeout", "load_frequency")
_GCS_STR = ("endpoint_override", "scheme", "project_id", "target_service_account")
_GCS_STR += ("default_bucket_location",)
_GCS_BOOL = ("anonymous",)
_GCS_FLOAT = ("retry_limit_seconds",)
_SECRETS = ("access_key", "secret_key", "session_token", "access_token")


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
    if not raw:
        raise UserError(f"--storage-path is empty; give {ACCEPTED}")
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if not scheme:
        for known in ("s3", "gs", "gcs", "file"):
            if raw.lower().startswith(f"{known}:"):
                raise UserError(
                    f"--storage-path {raw} is missing '//' after '{known}:'; "
                    f"write it as {known}://{raw.split(':', 1)[1].lstrip('/')}"
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
            + _CREDENTIALS_HINT[scheme]
        )
    bucket = parts.netloc
    if not bucket:
        raise UserError(f"--storage-path {raw} names no bucket; write {scheme}://BUCKET/PATH")
    prefix = "/".join(p for p in parts.path.split("/") if p)
    root = f"{bucket}/{prefix}" if prefix else bucket
    options = _parse_options(raw, scheme, parts.query)
    if check and scheme == "s3" and not options.get("region"):
        region = None if options.get("endpoint_override") else _bucket_region(bucket)
        if region:
            options["region"] = region
    query = urlencode(_ordered(options), safe=":/")
    uri = f"{scheme}://{root}" + (f"?{query}" if query else "")
    storage = Storage(uri=uri, fs=_filesystem(scheme, options), root=root)
    if check:
        _check_object_store(storage, _filesystem(scheme, options, quick=True), options)
    return storage


def _parse_options(raw: str, scheme: str, query: str) -> dict[str, Any]:
    kinds = {
        "s3": (_S3_STR, _S3_BOOL, _S3_FLOAT),
        "gs": (_GCS_STR, _GCS_BOOL, _GCS_FLOAT),
    }[scheme]
    accepted = sorted(k for group in kinds for k in group)
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in options:
            raise UserError(f"--storage-path {raw} gives {key} twice; keep one")
        if key in _SECRETS:
            raise UserError(
                f"--storage-path {raw.split('?', 1)[0]}?...: {key} does not belong in the path, "
                f"where logs and run records would keep it; {_CREDENTIALS_HINT[scheme]}"
            )
        if key in kinds[1]:
            if value.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--storage-path {raw}: {key}={value} must be true or false")
            options[key] = value.lower() in ("true", "1")
        elif key in kinds[2]:
            try:
                options[key] = float(value)
            except ValueError:
                raise UserError(
                    f"--storage-path {raw}: {key}={value} must be a number of seconds"
                ) from None
        elif key in kinds[0]:
            options[key] = value
        else:
            raise UserError(
                f"--storage-path {raw}: unknown option {key!r}; "
                f"{scheme}:// accepts {', '.join(accepted)}"
            )
    # "http://host:port" is the form Ray's docs and boto3 use; pyarrow wants host:port
    # and the scheme apart.
    endpoint = options.get("endpoint_override", "")
    match = re.match(r"(https?)://(.*)$", endpoint)
    if match:
        if options.get("scheme", match[1]) != match[1]:
            raise UserError(
                f"--storage-path {raw}: endpoint_override says {match[1]} but scheme says "
                f"{options['scheme']}; keep one"
            )
        options["scheme"], options["endpoint_override"] = match[1], match[2].rstrip("/")
    if options.get("scheme", "https") not in ("http", "https"):
        raise UserError(f"--storage-path {raw}: scheme={options['scheme']} must be http or https")
    return options


def _ordered(options: dict[str, Any]) -> list[tuple[str, str]]:
    """The options in a stable order (the endpoint first), as URI query text."""
    first = [k for k in ("endpoint_override", "scheme", "region") if k in options]
    keys = first + sorted(k for k in options if k not in first)
    return [
        (k, str(options[k]).lower() if isinstance(options[k], bool) else _num(options[k]))
        for k in keys
    ]


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bucket_region(bucket: str) -> str | None:
    """The AWS region of `bucket`, as pyarrow's own URI parsing finds it; None if unknown.

    A client in the wrong region gets redirects pyarrow does not follow. None leaves
    the choice to the SDK (AWS_DEFAULT_REGION, the profile), and the check that follows
    says what is wrong if the bucket is unusable.
    """
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def _filesystem(scheme: str, options: dict[str, Any], quick: bool = False) -> pafs.FileSystem:
    if scheme == "gs":
        kwargs = {k: v for k, v in options.items() if k != "retry_limit_seconds"}
        limit = options.get("retry_limit_seconds", _CHECK_GCS_RETRY_S if quick else None)
        if limit is not None:
            kwargs["retry_time_limit"] = datetime.timedelta(seconds=limit)
        return pafs.GcsFileSystem(**kwargs)
    kwargs = dict(options)
    # One PutObject for a small file instead of pyarrow's default three-request
    # multipart upload; errors then surface on write/close rather than on open.
    kwargs.setdefault("allow_delayed_open", True)
    kwargs.setdefault("connect_timeout", _CHECK_CONNECT_S if quick else _CONNECT_S)
    kwargs.setdefault("request_timeout", _CHECK_REQUEST_S if quick else _REQUEST_S)
    if "load_frequency" in kwargs:
        kwargs["load_frequency"] = int(kwargs["load_frequency"])
    if quick:
        # Not kept by pickling: an unpickled S3FileSystem has the SDK's default
        # (standard, 3 attempts), which is also what the run's filesystem uses.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_CHECK_ATTEMPTS)
    return pafs.S3FileSystem(**kwargs)


_CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
    "or give the nodes an instance profile",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`, "
    "or give the nodes a service account",
}
_MAKE_BUCKET = {"s3": "aws s3 mb s3://{}", "gs": "gcloud storage buckets create gs://{}"}


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
                f"({_MAKE_BUCKET[scheme].format(bucket)}) or fix --storage-path"
            )
        info = fs.get_file_info(storage.root)
        if info.type == pafs.FileType.File:
            raise UserError(
                f"--storage-path {storage.display()} is an object (a file), not a folder; "
                "give a folder path"
            )
        new_top = _highest_missing(quick) if info.type == pafs.FileType.NotFound else None
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
        raise UserError(_explain(storage, err, endpoint)) from None


def _highest_missing(storage: Storage) -> str:
    """The highest folder from the root up that does not exist yet (the bucket exists)."""
    top = storage.root
    while "/" in top and not storage.exists(top.rsplit("/", 1)[0]):
        top = top.rsplit("/", 1)[0]
    return top


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


def _explain(storage: Storage, err: OSError, endpoint: str) -> str:
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
            + _CREDENTIALS_HINT[scheme]
        )
    if "NO_SUCH_BUCKET" in text:
        bucket = storage.root.split("/", 1)[0]
        return (
            f"bucket '{bucket}' does not exist at {endpoint}; create it "
            f"({_MAKE_BUCKET[scheme].format(bucket)}) or fix --storage-path"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"\s*\(Request ID: [^)]*\)", "", first)
    return f"cannot use {where}: {first}; check --storage-path and the endpoint"


# ---------------------------------------------------------------------------------------
# preflight


def preflight(storage: Storage, timeout_s: float = 60.0) -> None:
    """Prove that every alive Ray node reads and writes the same `storage`.

    The driver writes a marker holding a random token; one tiny task pinned to each
    node reads it back and writes its own; the driver then reads every node's
    marker. Anything else (a node that cannot see the driver's marker, a marker the
    driver cannot see, an error, a task still running after `timeout_s`) is one
    UserError naming the node. The markers are removed either way.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    folder = storage.path(PREFLIGHT_DIR, token)
    marker = f"{folder}/driver"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return
    # A cluster of one node, this process's own, sees exactly what this process sees.
    if [n["NodeID"] for n in nodes] == [ray.get_runtime_context().get_node_id()]:
        return
    check = ray.remote(num_cpus=0, max_retries=0)(_node_check)
    try:
        storage.write_bytes(marker, token.encode())
        pending = {
            check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(storage, marker, f"{folder}/{token}-{node['NodeID']}", token): node
            for node in nodes
        }
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref in late:
            with contextlib.suppress(Exception):  # best effort: the task may be stuck in I/O
                ray.cancel(ref, force=True)
        if late:
            raise UserError(
                f"node {_node_name(pending[late[0]])} did not finish checking "
                f"{storage.display()} within {timeout_s:g} s (a hung mount or an overloaded "
                "node); check that node's storage, or raise the preflight timeout"
            )
        for ref in done:
            node = pending[ref]
            try:
                problem = ray.get(ref)
            except Exception as err:  # the node died, or its worker could not start
                problem = f"failed its storage check ({str(err).splitlines()[0]})"
            if problem:
                raise UserError(f"node {_node_name(node)} {problem}")
            own = f"{folder}/{token}-{node['NodeID']}"
            if not _holds(storage, own, token):
                raise UserError(
                    f"node {_node_name(node)} wrote {storage.display(own)} but the driver "
                    f"cannot see it: {_not_shared(storage)}"
                )
    except OSError as err:  # the driver's own reads and writes; resolve() passed moments ago
        raise UserError(f"the driver {_node_error(storage, err)}") from None
    finally:
        _remove_preflight(storage, folder)


def _node_check(storage: Storage, marker: str, own: str, token: str) -> str:
    """On one node: read the driver's marker, write this node's. "" or what went wrong."""
    try:
        if not _holds(storage, marker, token):
            return f"cannot see {storage.display()} that the driver wrote: {_not_shared(storage)}"
        storage.write_bytes(own, token.encode())
    except OSError as err:
        return _node_error(storage, err)
    return ""


def _node_error(storage: Storage, err: OSError) -> str:
    """What an OSError on one machine means, to follow "node X " or "the driver "."""
    if storage.is_local:
        return (
            f"cannot use {storage.display()} ({str(err).splitlines()[0]}); check that "
            "folder's mount and permissions there"
        )
    endpoint = dict(parse_qsl(urlsplit(storage.uri).query)).get("endpoint_override", "")
    return _explain(storage, err, endpoint or "the default endpoint")


def _holds(storage: Storage, fs_path: str, token: str) -> bool:
    try:
        return storage.read_bytes(fs_path) == token.encode()
    except FileNotFoundError:
        return False


def _not_shared(storage: Storage) -> str:
    if storage.is_local:
        return (
            "it is not shared storage; mount the same NFS/EFS path on every node "
            "or use --storage-path s3://BUCKET/PATH"
        )
    return (
        "the nodes reach different storage; give an endpoint_override that every node "
        "reaches as the same server (not 127.0.0.1 or localhost)"
    )


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def _remove_preflight(storage: Storage, folder: str) -> None:
    """Delete this preflight's folder, and the shared parent once no preflight uses it."""
    with contextlib.suppress(OSError):
        storage.delete_dir(folder)
        parent = storage.path(PREFLIGHT_DIR)
        if storage.is_local:
            os.rmdir(parent)  # refuses while another run's preflight is in there
        elif not storage.list_dir(parent):
            storage.delete_dir(parent)
