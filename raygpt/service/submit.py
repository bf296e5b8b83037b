"""A sweep submitted to the service (POST /sweeps): its body checked, its flags read as
`python -m raygpt.sweep` reads them, its configs validated by that command's own code in
a folder laid out like the job's, its demand checked against its owner's quota and the
cluster, and its row queued.

What the Ray half reads of a queued sweep: `name` (the job's --name), `storage_path` (its
--storage-path), `flags` and `experiment_toml` as submitted, and `files` ({relative path:
text}). The job runs `python -m raygpt.sweep EXPERIMENT_FILE FLAGS` (no EXPERIMENT_FILE
when none was sent) in a folder that holds `files` at their paths and the experiment's
text as EXPERIMENT_FILE, so the flags' relative paths find them as they did here; with
$RAYGPT_SERVICE unset there, or the job would submit itself again. The demand, resolved
here and never null: `workers_per_trial`, `cpus_per_worker`, `gpus_per_worker` (0: no
GPU) and `max_concurrent_trials` (as given, else as many as fit the owner's quota and
the cluster).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import sqlalchemy as sa
from fastapi import Request

import raygpt
from raygpt import storage
from raygpt.errors import first_line
from raygpt.redact import redact
from raygpt.service import admission, auth, index
from raygpt.service import db as schema
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import remote

log = logging.getLogger("raygpt.service")

EXPERIMENT_FILE = "experiment.toml"  # the experiment's name in the job's folder
MAX_BODY_BYTES = remote.MAX_FILES_BYTES + (1 << 20)  # the files, the TOML and the flags
MAX_FILES = 64
VALIDATE_TIMEOUT_S = 60

# Flags the service sets for every sweep, or that make no sense in a queue, by their
# argparse dest: why each is refused.
OWNED_FLAGS = {
    "storage_path": "the service runs every sweep under its own storage root",
    "address": "the service runs every sweep on its own cluster",
    "service": "the sweep is at the service already",
    "token": "the token goes in the Authorization header",
    "follow": "follow a submitted sweep with python -m raygpt.sweep --follow or the page",
    # A name must be new to the service (409 otherwise), so there is nothing to resume,
    # and overwriting would delete a folder the service does not own.
    "resume": "a submitted sweep's name must be new, so there is nothing to resume",
    "overwrite": "a submitted sweep's name must be new, so there is nothing to overwrite",
    # A transfer runs one sweep per proxy size under one folder that is no sweep folder.
    "transfer": "a transfer runs several sweeps: run it on the head with python -m raygpt.sweep",
}


class Refused(Exception):
    """A request refused with `status` and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def submit(
    db: sa.Engine,
    store: storage.Storage,
    owner: auth.User,
    body: Any,
    cluster_totals: Callable[[], Mapping[str, float]],
) -> dict[str, Any]:
    """Check a submission's body and queue it: its row's id, name, status and page. A
    Refused (or a UserError, 400) says why not, and then nothing is queued."""
    experiment, flags, files = _submission(body)
    _refuse_secrets(experiment, flags)
    _check_flags(flags)
    found = _validate(experiment, flags, files)
    name = found["name"]
    for key in ("resume", "overwrite", "address", "transfer"):  # the [sweep] table's too
        if found[key]:
            raise Refused(400, f"the experiment sets {key}: {OWNED_FLAGS[key]}; drop it")
    totals = cluster_totals()  # only now: a bad submission costs Ray nothing
    quotas = admission.Quotas(admission.Quota(owner.gpu_quota, owner.cpu_quota))
    demand, cpus, gpus = _demand(found, totals, quotas.of(owner.name))
    admission.check_submittable(owner.name, demand, quotas, totals)
    uri = index.folder_uri(store, name)
    with db.connect() as conn:
        taken = conn.execute(
            sa.select(schema.sweeps.c.id).where(schema.sweeps.c.name == name)
        ).first()
    if taken is not None:
        raise Refused(
            409, f"sweep name {name!r} is taken (sweep {taken[0]}); choose another --name"
        )
    try:
        in_storage = store.exists(store.path(name))
    except OSError as err:
        raise Refused(503, f"cannot read {store.display()}: {redact(first_line(err))}") from None
    if in_storage:
        raise Refused(
            409, f"{store.display(store.path(name))} exists already; choose another --name"
        )
    values = {
        "name": name,
        "owner": owner.name,
        "status": schema.QUEUED,
        "submitted_at": time.time(),
        "storage_path": index.folder_uri(store),
        "folder_uri": uri,
        "experiment_toml": experiment,
        "flags": flags,
        "files": files,
        "workers_per_trial": found["workers_per_trial"],
        "cpus_per_worker": cpus,
        "gpus_per_worker": gpus,
        "max_concurrent_trials": demand.max_concurrent,
    }
    try:
        with db.begin() as conn:
            sweep_id = conn.execute(
                sa.insert(schema.sweeps).values(values).returning(schema.sweeps.c.id)
            ).scalar_one()
    except sa.exc.IntegrityError:  # another submission took the name a moment ago
        raise Refused(409, f"sweep name {name!r} is taken; choose another --name") from None
    log.info("sweep %d %r queued by %s", sweep_id, name, owner.name)
    return {
        "id": sweep_id,
        "name": name,
        "status": schema.QUEUED,
        "page": f"/sweeps/{sweep_id}/page",
    }


async def read_body(request: Request) -> Any:
    """The JSON body of a submission, at most MAX_BODY_BYTES."""
    too_big = f"the submission is over {MAX_BODY_BYTES >> 20} MiB; put large data on storage the cluster sees"
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise Refused(413, too_big)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, too_big)
    try:
        return json.loads(body)
    except ValueError:
        raise Refused(
            400,
            'the body is not JSON; send {"experiment_toml": ..., "flags": [...], "files": {...}}',
        ) from None


def _submission(body: Any) -> tuple[str | None, list[str], dict[str, str]]:
    """The body's three fields, each checked for its shape."""
    if not isinstance(body, dict):
        raise Refused(400, 'the body must be a JSON object: {"experiment_toml", "flags", "files"}')
    extra = sorted(set(body) - {"experiment_toml", "flags", "files"})
    if extra:
        raise Refused(
            400, f"unknown field {extra[0]!r}; a submission has experiment_toml, flags and files"
        )
    experiment, flags, files = (
        body.get("experiment_toml"),
        body.get("flags") or [],
        body.get("files") or {},
    )
    if experiment is not None and not isinstance(experiment, str):
        raise Refused(400, "experiment_toml must be the experiment file's text, or null")
    if not isinstance(flags, list) or not all(isinstance(f, str) and "\0" not in f for f in flags):
        raise Refused(400, "flags must be a list of strings, as on the command line")
    if not isinstance(files, dict) or not all(isinstance(t, str) for t in files.values()):
        raise Refused(400, "files must map relative paths to their text")
    if len(files) > MAX_FILES:
        raise Refused(400, f"{len(files)} files: the service takes up to {MAX_FILES}")
    size = sum(len(t.encode()) for t in [*files.values(), experiment or ""])
    if size > remote.MAX_FILES_BYTES:
        raise Refused(
            413,
            f"the files hold {size >> 20} MiB, over {remote.MAX_FILES_BYTES >> 20} MiB; put large data on storage the cluster sees",
        )
    for path in files:
        parts = PurePosixPath(path).parts
        if (
            not parts
            or path.startswith(("/", "~"))
            or "\\" in path
            or "\0" in path
            or ".." in parts
            or path == EXPERIMENT_FILE
        ):
            raise Refused(
                400,
                f"file name {path!r} must be a relative path inside the sweep's folder (no '..', not {EXPERIMENT_FILE})",
            )
    return experiment, flags, files


def _refuse_secrets(experiment: str | None, flags: list[str]) -> None:
    """Refuse a credential in a flag or the experiment: the service keeps both in its
    database and passes the flags to the job's command line, which `ray job list` shows.
    Credentials reach the job through the cluster's environment instead."""
    for where, text in [("the experiment file", experiment or ""), *(("a flag", f) for f in flags)]:
        if redact(text) != text:
            shown = redact(text) if where == "a flag" else "its text"
            raise Refused(
                400,
                f"{where} holds a credential ({shown}); the service stores what it is sent, so "
                "give credentials to the cluster's environment (e.g. MLFLOW_TRACKING_PASSWORD, "
                "AWS_SECRET_ACCESS_KEY) and send the sweep without them",
            )


def _check_flags(flags: list[str]) -> None:
    """Refuse a flag the service owns, a positional word and --help, by argparse's reading."""
    if any(f in ("-h", "--help") or f.startswith("--help=") for f in flags):
        raise Refused(400, "flags hold --help; send the sweep's flags only")
    try:  # a parser of its own: requests run on several threads
        given = vars(sweep_cli.build_parser().parse_args(flags))
    except SystemExit:  # help asked in another way (-vh): argparse has printed it, no harm
        raise Refused(400, "flags hold --help; send the sweep's flags only") from None
    if given.get("experiment") is not None:
        raise Refused(
            400,
            f"flags hold the word {given['experiment']!r}; send the experiment file's text as experiment_toml",
        )
    for dest, why in OWNED_FLAGS.items():
        if dest in given:
            raise Refused(
                400, f"--{dest.replace('_', '-')} is not for a submission: {why}; drop it"
            )


# Runs in a child process whose working folder holds the submission's files, so relative
# paths in the flags resolve as they will for the job. The server's own working folder
# stays as it is (os.chdir would move every thread's).
_VALIDATOR = """
import json, sys
from raygpt.errors import UserError
from raygpt.sweep.cli import configs_from_argv
try:
    sweep, train = configs_from_argv(json.load(sys.stdin))
except UserError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(0)
# the name the sweep driver gives a sweep without --name (sweep/driver.py)
name = sweep.name or f"sweep-{'-'.join(sweep.optimizers)}-{sweep.search}"
keys = ("workers_per_trial", "gpus_per_trial", "use_gpu", "max_concurrent_trials", "resume",
        "overwrite", "address", "transfer")
found = {k: getattr(sweep, k) for k in keys}
print(json.dumps({**found, "name": name, "cpus_per_worker": train.cpus_per_worker}))
"""


def _validate(experiment: str | None, flags: list[str], files: dict[str, str]) -> dict[str, Any]:
    """What `python -m raygpt.sweep` makes of the submission, in a folder like the job's."""
    with tempfile.TemporaryDirectory(prefix="raygpt-submit-") as folder:
        root = Path(folder)
        try:
            for rel, text in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text, encoding="utf-8")
        except OSError as err:  # "a" and "a/b" both given, a name too long, ...
            raise Refused(400, f"cannot lay the files out: {first_line(err)}") from None
        argv = list(flags)
        if experiment is not None:
            (root / EXPERIMENT_FILE).write_text(experiment, encoding="utf-8")
            argv = [EXPERIMENT_FILE, *flags]
        env = dict(os.environ)
        package_root = str(Path(raygpt.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            done = subprocess.run(
                [sys.executable, "-c", _VALIDATOR],
                input=json.dumps(argv),
                capture_output=True,
                text=True,
                cwd=root,
                env=env,
                timeout=VALIDATE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise Refused(
                400, f"checking the sweep took over {VALIDATE_TIMEOUT_S} s; simplify it"
            ) from None
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.error("sweep check failed: %s", redact(done.stderr.strip()[-2000:]))
        raise Refused(
            500, "checking the sweep failed inside the service; see the service's log"
        ) from None
    if "error" in found:
        raise Refused(400, redact(found["error"]))
    return found


def _demand(
    found: dict[str, Any], totals: dict, quota: admission.Quota
) -> tuple[admission.Demand, float, float]:
    """The sweep's demand, and each worker's CPUs and GPUs, as the sweep driver places
    them (sweep/driver.py): each of a trial's workers holds cpus_per_worker (1 when not
    given) and, on GPUs, gpus_per_trial (1 when not given); `use_gpu` auto means GPUs
    where the cluster has any. Without --max-concurrent-trials, as many trials as fit
    both the owner's quota and the cluster (admission.decide may start fewer)."""
    use_gpu = found["use_gpu"] == "true" or (
        found["use_gpu"] == "auto" and float(totals.get("GPU", 0) or 0) > 0
    )
    if found["gpus_per_trial"] is not None and not use_gpu:
        raise Refused(
            400,
            f"--gpus-per-trial {found['gpus_per_trial']:g} but the cluster has no GPU in use; drop it",
        )
    workers = int(found["workers_per_trial"])
    gpus = (found["gpus_per_trial"] or 1.0) if use_gpu else 0.0
    cpus = float(found["cpus_per_worker"] or 1.0)
    trial = {"CPU": workers * cpus, "GPU": workers * gpus}
    most = found["max_concurrent_trials"]
    if most is None:
        fits = [  # in Ray's units of 1e-4, as admission counts
            round(min(limit, float(totals.get(r, 0) or 0)) * 10_000) // round(trial[r] * 10_000)
            for r, limit in (("CPU", quota.cpus), ("GPU", quota.gpus))
            if trial[r] > 0
        ]
        most = max(1, min(fits))
    return admission.Demand(trial, int(most)), cpus, gpus
