"""A run or sweep folder: its name, the record that says raygpt wrote it, and its lock.

Three promises, each kept before any Ray work starts:

- A name is one plain folder name (`check_name`): no path separator, no leading
  '.' (so never '.' or '..'), printable, at most NAME_MAX bytes. `Storage.path`
  drops parts that are only slashes, so `--name /` would be the storage root
  itself and `--name ../x` a folder beside it; the rule keeps every name inside
  the root, one level down.
- `--overwrite` deletes only a folder raygpt wrote (`check_run_dir`): one whose
  run.json (a run) or sweep.json (a sweep) is raygpt's record. A folder of
  anything else is refused and left as it is, whatever its name.
- One writer per folder (`lock`): a lease `<root>/.raygpt-locks/<name>.json`
  names its holder (host, pid, a random token, start and heartbeat times). It lies
  outside the folder, so --overwrite's delete never removes it. A second writer is
  refused in one line naming the holder. A lease whose heartbeat is older than
  RAYGPT_LOCK_STALE_S (default 60 s), or whose holder on this host is no longer
  running, is taken over with a printed line.

How the lease is made exclusive: on a local disk (or NFS) it appears whole with a
hard link, which fails if the name exists. An object store has no create-if-absent
through pyarrow, so there the writer PUTs its lease, waits RAYGPT_LOCK_SETTLE_S
(default 1 s) and reads it back: of writers that raced, only the last one's token
is there, and every other backs off. A takeover (replacing a stale lease) uses the
same write, settle and read-back on every filesystem. A heartbeat's age compares the
holder's clock with this host's, so the hosts of a cluster keep their clocks in step
(NTP) to well within the stale timeout.

config/train.py imports this module for the name rule, so it imports nothing above
raygpt.errors at load time (results.py, for the record names, only when used).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from raygpt.errors import UserError

if TYPE_CHECKING:
    from raygpt.storage import Storage

NAME_MAX = 200  # bytes of UTF-8: room under the usual 255 for temp and lease suffixes
LOCKS_DIR = ".raygpt-locks"
STALE_ENV = "RAYGPT_LOCK_STALE_S"
SETTLE_ENV = "RAYGPT_LOCK_SETTLE_S"
DEFAULT_STALE_S = 60.0
DEFAULT_SETTLE_S = 1.0
HEARTBEAT_S = 10.0  # at most; a third of the stale timeout when that is shorter
_NAME_RULE = (
    "give a plain folder name (no '/' or '\\', no leading '.', printable characters, "
    f"at most {NAME_MAX} characters, counted as UTF-8 bytes)"
)


# --------------------------------------------------------------------------- the name


def name_problem(name: Any) -> str | None:
    """What is wrong with `name` as a folder name, or None when it is fine."""
    if not isinstance(name, str):
        return "is not text"
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with '.'"
    if not name.isprintable():
        return "contains a control character"
    size = len(name.encode())
    if size > NAME_MAX:
        return (
            f"is {len(name)} characters long"
            if size == len(name)
            else f"is {size} bytes long in UTF-8"
        )
    return None


def check_name(name: Any, what: str = "name") -> str:
    """`name` if it is one plain folder name, else a one-line UserError that starts
    with `what` ("run name", "--hf /x/..: folder name") and says what to do."""
    problem = name_problem(name)
    if problem is not None:
        raise UserError(f"{what} {_show(name)} {problem}; {_NAME_RULE}")
    return name


def _show(name: Any) -> str:
    """`name` quoted on one line, cut short when long (a 300-character name is noise)."""
    if isinstance(name, str) and len(name) > 60:
        return f"{name[:40]!r}... ({len(name)} characters)"
    return repr(name)


# --------------------------------------------------------------------------- the record


def _records() -> dict[str, tuple[str, tuple[str, ...]]]:
    """kind -> (the record raygpt writes in such a folder, keys that record holds)."""
    from raygpt.results import RUN_FILE, SWEEP_FILE

    return {
        "run": (RUN_FILE, ("config", "environment")),
        "sweep": (SWEEP_FILE, ("sweep", "config")),
    }


def written_as(storage: Storage, folder: str) -> str | None:
    """Which record of raygpt's `folder` holds: "run", "sweep", or None (neither)."""
    for kind, (record, keys) in _records().items():
        try:
            value = json.loads(storage.read_bytes(f"{folder}/{record}"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and all(isinstance(value.get(k), dict) for k in keys):
            return kind
    return None


def check_run_dir(
    storage: Storage, run_path: str, resume: bool, overwrite: bool, kind: str = "run"
) -> bool:
    """Refuse to clobber an existing run, to replace or resume a folder raygpt did not
    write, or to resume one that does not exist.

    Returns whether the folder exists with content. Writes nothing.
    """
    name = run_path.rstrip("/").rsplit("/", 1)[-1]
    where = storage.display()
    if storage.exists(run_path) and not storage.is_dir(run_path):
        raise UserError(
            f"{storage.display(run_path)} is a file, not a {kind} folder; pick a new --name"
        )
    exists = bool(storage.list_dir(run_path))
    if resume and not exists:
        raise UserError(
            f"cannot resume: no {kind} named {name!r} in {where}; check --name and --storage-path"
        )
    if not exists:
        return False
    if not resume and not overwrite:
        raise UserError(
            f"a {kind} named {name!r} already exists in {where}; "
            "pass --resume to continue it, --overwrite to replace it, or a new --name"
        )
    found = written_as(storage, run_path)
    if found != kind:
        record = _records()[kind][0]
        what = (
            f"a raygpt {found}, not a {kind}"
            if found
            else f"files raygpt did not write (no {record})"
        )
        action = "resume" if resume else "replace"
        raise UserError(
            f"{storage.display(run_path)} holds {what}; raygpt will not {action} it: "
            "choose another --name (or --storage-path), or move that folder away yourself"
        )
    return True


def prepare_run_dir(
    storage: Storage, run_path: str, resume: bool, overwrite: bool, kind: str = "run"
) -> None:
    """check_run_dir, then remove the old folder when --overwrite asked for it."""
    if check_run_dir(storage, run_path, resume, overwrite, kind) and overwrite:
        storage.delete_dir(run_path)


# --------------------------------------------------------------------------- the lock


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{env}={text!r} must be a number of seconds >= 0")
    return value


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class Lease:
    """The lock on one run or sweep folder; hold it with `with lock(...)`."""

    def __init__(self, storage: Storage, name: str, kind: str):
        self.storage = storage
        self.name = name
        self.kind = kind
        self.path = storage.path(LOCKS_DIR, f"{name}.json")
        self.token = uuid.uuid4().hex
        now = time.time()
        self.record = {
            "name": name,
            "kind": kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started_at": now,
            "heartbeat_at": now,
        }
        self.stale_s = _seconds(STALE_ENV, DEFAULT_STALE_S)
        self.settle_s = _seconds(SETTLE_ENV, DEFAULT_SETTLE_S)
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._locks_dir = storage.path(LOCKS_DIR)
        # The highest folder the lease brings into being (the locks folder, or the storage
        # root and above on a fresh --storage-path): removed again on release when empty,
        # so a run refused after this point leaves nothing behind.
        self._new_top = storage.highest_missing(self._locks_dir)

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> Lease:
        """Take the lock, or raise a one-line UserError naming its holder."""
        for _ in range(5):  # a lease that comes and goes between two looks is looked at again
            held = self._read()
            if held is None:
                won = self._create()
            else:
                reason = self._takeover_reason(held)
                if reason is None:
                    raise UserError(self._refusal(held))
                won = self._take_over(held, reason)
            if won:
                self._beats = threading.Thread(
                    target=self._heartbeat, name=f"raygpt-lock-{self.name}", daemon=True
                )
                self._beats.start()
                return self
        raise UserError(
            f"cannot take the lock on {self.kind} {self.name!r} in {self.storage.display()}: "
            "other processes keep taking and releasing it; try again in a few seconds"
        )

    def _read(self) -> dict[str, Any] | None:
        """The lease as stored; None if there is none. An unreadable one counts as held
        by an unknown process, its file's modification time standing in for a heartbeat."""
        try:
            raw = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            value = json.loads(raw)
            if isinstance(value, dict) and isinstance(value.get("token"), str):
                return value
        mtime = self.storage.fs.get_file_info(self.path).mtime
        return {"token": None, "heartbeat_at": mtime.timestamp() if mtime else 0.0}

    def _encoded(self) -> bytes:
        return json.dumps(self.record, indent=2).encode()

    def _create(self) -> bool:
        """Write a lease where there was none; whether this process now holds it."""
        if not self.storage.is_local:
            return self._write_and_confirm()
        folder = os.path.dirname(self.path)
        tmp = os.path.join(folder, f".{self.token}.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as out:
                out.write(self._encoded())
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, self.path)  # atomic, and refused if the name exists (NFS too)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create instead
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as out:
                    out.write(self._encoded())
            return True
        except FileNotFoundError:  # a releaser removed the empty locks folder meanwhile
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _write_and_confirm(self) -> bool:
        """PUT (or atomically replace) the lease, let racing writers land, read it back."""
        self.storage.write_bytes(self.path, self._encoded())
        try:
            time.sleep(self.settle_s)
            held = self._read()
        except BaseException:  # interrupted while settling: leave no lease of this process
            with contextlib.suppress(OSError):
                if (self._read() or {}).get("token") == self.token:
                    self.storage.delete_file(self.path)
            raise
        return held is not None and held.get("token") == self.token

    def _takeover_reason(self, held: dict[str, Any]) -> str | None:
        """Why `held` may be taken over (its holder is gone), or None while it is alive."""
        pid = held.get("pid")
        here = held.get("host") == socket.gethostname() and isinstance(pid, int)
        if here and not _pid_running(pid):
            return f"process {pid} on this host is no longer running"
        age = time.time() - float(held.get("heartbeat_at") or 0.0)
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, held: dict[str, Any], reason: str) -> bool:
        current = self._read()
        if current is None or current.get("token") != held.get("token"):
            return False  # it changed since it was judged: judge it again
        if not self._write_and_confirm():
            return False
        print(
            f"[raygpt] took over the lock on {self.kind} {self.name!r} from "
            f"{self._holder(held)} ({reason})",
            flush=True,
        )
        return True

    def _holder(self, held: dict[str, Any]) -> str:
        if not held.get("token"):
            return "an unknown process (its lease is unreadable)"
        started = held.get("started_at")
        since = f", since {_when(float(started))}" if started else ""
        return f"host {held.get('host')}, pid {held.get('pid')}{since}"

    def _refusal(self, held: dict[str, Any]) -> str:
        age = max(0.0, time.time() - float(held.get("heartbeat_at") or 0.0))
        return (
            f"{self.kind} {self.name!r} in {self.storage.display()} is in use by "
            f"{self._holder(held)} (last heartbeat {age:.0f} s ago); wait for it to finish "
            f"or choose another --name (a lock without a heartbeat for {self.stale_s:g} s "
            "is taken over)"
        )

    # ------------------------------------------------------------------ hold and release

    def _heartbeat(self) -> None:
        interval = max(0.1, min(HEARTBEAT_S, self.stale_s / 3))
        while not self._stop.wait(interval):
            try:
                held = self._read()
                # Gone (removed by hand, or with an empty locks folder another releaser
                # tidied on object storage): written again below. Another's: say so.
                if held is not None and held.get("token") != self.token:
                    print(
                        f"[raygpt] warning: the lock on {self.kind} {self.name!r} is now held "
                        f"by {self._holder(held)}; this process's writes may collide "
                        "with theirs",
                        flush=True,
                    )
                    return
                self.record["heartbeat_at"] = time.time()
                self.storage.write_bytes(self.path, self._encoded())
            except OSError as err:  # a storage hiccup: the next beat tries again
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                print(f"[raygpt] warning: lock heartbeat failed ({first})", flush=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this process's.
        Never raises: it runs on the way out of errors that must reach the user."""
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=60)  # a beat in flight must not re-create the lease
        with contextlib.suppress(OSError):
            held = self._read()
            if held is not None and held.get("token") == self.token:
                self.storage.delete_file(self.path)
            self._tidy()

    def _tidy(self) -> None:
        """Remove the folders the lease created, up to `_new_top`, where they are empty."""
        if self.storage.is_local:
            folder, top = self._locks_dir, self._new_top or self._locks_dir
            while True:
                os.rmdir(folder)  # refused while anything (another lease) is in there
                if folder == top:
                    return
                folder = os.path.dirname(folder)
        if self._new_top is None:
            return  # an object store's locks folder that was there before stays
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self._new_top, allow_not_found=True, recursive=True)
        infos = self.storage.fs.get_file_info(selector)
        if all(info.type == pafs.FileType.Directory for info in infos):
            self.storage.delete_dir(self._new_top)


@contextlib.contextmanager
def claim(
    storage: Storage, name: str, resume: bool, overwrite: bool, kind: str = "run"
) -> Iterator[Lease]:
    """check_run_dir on the folder `name`, then its lock, held for the block.

    The read-only refusals (it exists, it is not raygpt's) come first and take no lock,
    so they read the same whether or not another process holds it. The check runs again
    under the lock: the folder may have changed before the lock was taken.
    """
    check_name(name, f"{kind} name")
    run_path = storage.path(name)
    check_run_dir(storage, run_path, resume, overwrite, kind)
    with lock(storage, name, kind) as lease:
        check_run_dir(storage, run_path, resume, overwrite, kind)
        yield lease


@contextlib.contextmanager
def lock(storage: Storage, name: str, kind: str = "run") -> Iterator[Lease]:
    """Hold the lock on the folder `name` under the storage root for the block.

    Raises a one-line UserError when another live process holds it; released on the
    way out, errors and KeyboardInterrupt included.
    """
    check_name(name, f"{kind} name")
    lease = Lease(storage, name, kind).acquire()
    try:
        yield lease
    finally:
        lease.release()
