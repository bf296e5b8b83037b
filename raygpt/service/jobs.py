"""A queued sweep as a Ray job: submit it, read its state and its driver's log, stop it.

The job runs the sweep's own driver, the command a person would type:

    python -m raygpt.sweep experiment.toml <flags> --storage-path S --name N
        --max-concurrent-trials C

in a runtime_env working_dir made from the sweeps row (experiment.toml and the row's
`files`), so a sweep run through the service and one run by hand write the same folder.
The flags the service appends come last and win over any the user gave: the folder is
the one the row names, and the concurrency is the one admission reserved.

Each sweep's job has a submission id made from its row (`raygpt-sweep-<id>-<hash of its
folder>`), so a service that restarts, or a second replica, finds the job that it or an
earlier replica submitted, and never starts a sweep twice; the folder's hash keeps two
databases on one cluster (a test's, a team's) from taking each other's jobs.

The job server is the dashboard of the cluster this process joined; its address comes
from the cluster itself (Ray's GCS), as `ray job submit` finds it.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.service import db as schema

SUBMISSION_PREFIX = "raygpt-sweep-"
EXPERIMENT_FILE = "experiment.toml"
STOP_TIMEOUT_S = 60.0  # SIGTERM, Ray's 3 s grace, SIGKILL, then the actors' teardown
_POLL_S = 0.5

# Ray's JobStatus -> the service's sweep status (PENDING: its runtime env is being set up).
_STATUS = {
    "PENDING": schema.RUNNING,
    "RUNNING": schema.RUNNING,
    "SUCCEEDED": schema.SUCCEEDED,
    "FAILED": schema.FAILED,
    "STOPPED": schema.CANCELLED,
}
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


class JobServerError(UserError):
    """The cluster's job server did not answer: nothing is known about the job, and a
    later try may succeed."""


@dataclass(frozen=True)
class JobState:
    """A job as the service reads it: its sweep status, and when it ended (Unix
    seconds; None while it runs)."""

    status: str
    ended_at: float | None


def submission_id(sweep: Mapping[str, Any]) -> str:
    """The Ray job submission id of a sweeps row: the same for the same row, always."""
    folder = str(sweep.get("folder_uri") or f"{sweep['storage_path']}/{sweep['name']}")
    return f"{SUBMISSION_PREFIX}{sweep['id']}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}"


def command(sweep: Mapping[str, Any], concurrency: int) -> list[str]:
    """The sweep driver's command line (argv) for a sweeps row."""
    flags = sweep.get("flags") or []
    if isinstance(flags, str):  # a JSON column read back as text by a raw query
        flags = json.loads(flags)
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise UserError(f"sweep {sweep['id']}: its flags are not a list of strings; resubmit it")
    argv = [sys.executable, "-m", "raygpt.sweep"]
    if sweep.get("experiment_toml"):
        argv.append(EXPERIMENT_FILE)
    return [
        *argv,
        *flags,
        "--storage-path", str(sweep["storage_path"]),
        "--name", str(sweep["name"]),
        "--max-concurrent-trials", str(int(concurrency)),
    ]  # fmt: skip


def write_working_dir(sweep: Mapping[str, Any], into: Path) -> Path:
    """The job's working_dir in `into`: experiment.toml and the row's `files` (a JSON
    object of relative path -> text). A path that leaves the folder is refused."""
    files = dict(sweep.get("files") or {})
    if sweep.get("experiment_toml"):
        files[EXPERIMENT_FILE] = sweep["experiment_toml"]
    for name, text in files.items():
        rel = PurePosixPath(str(name))
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or not isinstance(text, str):
            raise UserError(
                f"sweep {sweep['id']}: file {str(name)!r} is not a relative path with text; "
                "resubmit it with files inside its folder"
            )
        path = into.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return into


def service_status(ray_status: Any) -> str:
    """A Ray JobStatus (or its name) as a sweep status of db.py."""
    return _STATUS[str(getattr(ray_status, "value", ray_status))]


def dashboard_url() -> str:
    """The job server of the cluster this process has joined (ray.init ran)."""
    import ray
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        raise UserError("this process has joined no Ray cluster; connect before using jobs")
    address = internal_kv._internal_kv_get(
        ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
    )
    if not address:
        raise UserError(
            "the Ray cluster runs no dashboard, which serves Ray jobs; start it with "
            "`ray start --head --include-dashboard=true` (pip install 'ray[default]')"
        )
    return f"http://{address.decode()}"


class Jobs:
    """The sweeps' Ray jobs on the cluster whose job server is at `address` (default:
    the dashboard of the cluster this process has joined)."""

    def __init__(self, address: str | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = address or dashboard_url()
        try:
            self.client = JobSubmissionClient(self.address)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise JobServerError(self._unreachable(err)) from None

    def _unreachable(self, err: BaseException) -> str:
        return (
            f"the Ray job server at {redact(self.address)} did not answer "
            f"({redact(first_line(err))}); check that the cluster's dashboard runs"
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except RuntimeError as err:
            if "status code 404" in str(err):
                raise LookupError(args[0] if args else "") from None
            raise JobServerError(self._unreachable(err)) from None
        except OSError as err:  # requests' ConnectionError is one
            raise JobServerError(self._unreachable(err)) from None

    def submit(self, sweep: Mapping[str, Any], concurrency: int) -> str:
        """Start a sweeps row's job; return its id. A job this row already has (an
        earlier replica submitted it) is taken as it is, whatever its state."""
        job_id = submission_id(sweep)
        if self.info(job_id) is not None:
            return job_id
        entrypoint = shlex.join(command(sweep, concurrency))
        with tempfile.TemporaryDirectory(prefix="raygpt-sweep-") as folder:
            # Unset there, or the sweep's CLI would submit it to the service again.
            runtime_env: dict[str, Any] = {"env_vars": {"RAYGPT_SERVICE": ""}}
            if any(write_working_dir(sweep, Path(folder)).iterdir()):
                runtime_env["working_dir"] = folder  # uploaded now: the folder may go after
            try:
                self._call(
                    "submit_job",
                    entrypoint=entrypoint,
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    metadata={"raygpt_sweep": str(sweep["id"]), "name": str(sweep["name"])},
                )
            except JobServerError:
                # "already exists": another replica submitted it a moment ago, and that
                # job is this sweep's; any other refusal stands.
                if self.info(job_id) is None:
                    raise
        return job_id

    def info(self, job_id: str) -> Any | None:
        """Ray's JobDetails of a job, or None where the cluster does not know it."""
        try:
            return self._call("get_job_info", job_id)
        except LookupError:
            return None

    def state(self, job_id: str) -> JobState | None:
        """The job's sweep status (running, succeeded, failed, cancelled) and end, or
        None where the cluster does not know the job (it ran on a cluster since gone)."""
        found = self.info(job_id)
        if found is None:
            return None
        status = service_status(found.status)
        end = found.end_time if status != schema.RUNNING else None
        return JobState(status, end / 1000.0 if end else None)

    def status(self, job_id: str) -> str | None:
        """The job's sweep status, or None where the cluster does not know the job."""
        found = self.state(job_id)
        return None if found is None else found.status

    def logs(self, job_id: str) -> str:
        """The job's driver log so far, secrets masked; empty for a job Ray does not know."""
        try:
            return redact(self._call("get_job_logs", job_id))
        except LookupError:
            return ""

    def stop(self, job_id: str, timeout_s: float = STOP_TIMEOUT_S) -> str | None:
        """Stop the job and wait until it has ended and its actors and placement groups
        are gone, so what it held is free again; return its final sweep status (None:
        unknown to the cluster). A one-line UserError if it outlives `timeout_s`."""
        found = self.info(job_id)
        if found is None:
            return None
        try:
            self._call("stop_job", job_id)
        except LookupError:
            return None
        deadline = time.monotonic() + timeout_s
        while str(getattr(found.status, "value", found.status)) not in _ENDED:
            if time.monotonic() > deadline:
                raise UserError(
                    f"Ray job {job_id} did not stop within {timeout_s:g} s; "
                    f"see `ray job status {job_id}` and stop it with `ray job stop {job_id}`"
                )
            time.sleep(_POLL_S)
            found = self.info(job_id)
            if found is None:
                return None
        if found.job_id:
            self._wait_released(found.job_id, deadline)
        return service_status(found.status)

    def _wait_released(self, ray_job_id: str, deadline: float) -> None:
        """Wait until no actor or placement group of the Ray job holds resources: the
        cluster frees them asynchronously after the driver ends."""
        from ray.util import state

        while True:
            try:
                actors = state.list_actors(
                    address=self.address,
                    filters=[("job_id", "=", ray_job_id), ("state", "!=", "DEAD")],
                    raise_on_missing_output=False,
                )
                groups = state.list_placement_groups(
                    address=self.address,
                    filters=[("creator_job_id", "=", ray_job_id), ("state", "!=", "REMOVED")],
                    raise_on_missing_output=False,
                )
            except Exception:  # the state API is best effort: the job itself has ended
                return
            if (not actors and not groups) or time.monotonic() > deadline:
                return
            time.sleep(_POLL_S)
