"""The service's HTTP API and web pages: `build_app(db, runner, storage_path)`.

A FastAPI app over the database (db.py), with what needs Ray behind a `Runner` (the Serve
deployment's, raygpt/service/jobs.py and queue.py), so this module starts nothing and its
tests need no cluster. Routes, JSON unless said:

- `GET /healthz`: the one route without a token.
- `POST /sweeps`: submit `{"experiment_toml": str | null, "flags": [str], "files":
  {relative path: text}}`; 201 with `{"id", "name", "status": "queued", "page"}`.
- `GET /sweeps` (`?owner=`, `?status=`, `?limit=`), `GET /sweeps/{id}`, `POST /sweeps/{id}/cancel`,
  `GET /sweeps/{id}/logs` (text; `?offset=N`: from character N on), `GET /trials?KEY=VALUE...`
  (db.parse_filters; `limit=N`), `GET /lr-law?KEY=VALUE...` (those trials' lr law: law.py).
- `GET /` and `GET /sweeps/{id}/page`: the HTML pages (pages.py), and the plots they show
  (`GET /sweeps/{id}/plots/NAME.png`).

Every other request carries `Authorization: Bearer TOKEN` (auth.verify): a missing,
unknown or revoked token is 401, cancelling another user's sweep 403; anyone signed in
reads everything. A browser cannot send that header, so a GET of a page also takes the
token once as `?token=`: the answer is a redirect to the same page without it, setting it
as an HttpOnly cookie, and later GETs (the page's refresh, its plots) carry the cookie. A
cookie never authorises a POST: a page on another site cannot make a browser submit or
cancel. The token is taken out of the request's query before anything, Uvicorn's access
log included, reads it. Every refusal is one line: `{"error": "..."}`.

A submission is checked and queued by submit.py, whose docstring says what the job that
runs it is given.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from raygpt import storage
from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.service import auth, index, law, pages, submit
from raygpt.service import db as schema
from raygpt.service.submit import Refused

log = logging.getLogger("raygpt.service")

COOKIE = "raygpt_token"
COOKIE_MAX_AGE_S = 7 * 24 * 3600
_QUERY_TOKEN = "raygpt.query_token"  # where the middleware keeps a ?token= it took out
_PLOT = re.compile(r"[\w.-]+\.png")


class Runner(Protocol):
    """What the app asks of Ray (the Serve deployment implements it)."""

    def wake(self) -> None: ...  # a sweep was queued or cancelled: run the queue soon
    def stop_job(self, job_id: str) -> None: ...  # stop a running sweep's job, wait till stopped
    def job_logs(self, job_id: str) -> str: ...  # the job's driver log so far
    def cluster(self) -> tuple[dict, dict]: ...  # (free, totals): {"CPU": .., "GPU": ..}


def build_app(db: sa.Engine, runner: Runner, storage_path: str) -> FastAPI:
    """The service's app over `db`, starting sweeps through `runner` under `storage_path`."""
    store = storage.resolve(storage_path, check=False)
    shown_db = redact(db.url.render_as_string(hide_password=True))
    # No /docs or /openapi.json: they would answer without a token.
    app = FastAPI(title="raygpt service", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_TakeQueryToken)

    @app.exception_handler(Refused)
    async def _refused(_request: Request, err: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err.status, str(err), headers)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, err: UserError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code in (404, 405):  # routing's own: say which route, not "Not Found"
            return _error(
                err.status_code,
                f"no route {request.method} {request.url.path}; see docs/service.md",
            )
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        where = ".".join(str(p) for p in problems[0].get("loc", ())[1:]) if problems else ""
        said = problems[0].get("msg", "invalid") if problems else "invalid"
        return _error(400, f"{where or 'the request'}: {said}")

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _database(_request: Request, err: sa.exc.SQLAlchemyError) -> JSONResponse:
        log.error("database error: %s", redact(first_line(err)))
        return _error(503, schema.explain(shown_db, err))

    def user(request: Request) -> auth.User:
        """The signed-in user: the bearer token, or on a GET the cookie."""
        if request.scope.get(_QUERY_TOKEN) is not None:
            raise Refused(
                400, "?token= is for the web pages only; send Authorization: Bearer TOKEN"
            )
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Refused(401, "the Authorization header is not 'Bearer TOKEN'")
        else:
            token = request.cookies.get(COOKIE, "") if request.method == "GET" else ""
            if not token and COOKIE in request.cookies:
                raise Refused(
                    401, "a browser's cookie only reads; send Authorization: Bearer TOKEN"
                )
            if not token:
                raise Refused(
                    401,
                    "no token: send Authorization: Bearer TOKEN (an admin prints one with "
                    "python -m raygpt.service add-user NAME)",
                )
        found = auth.verify(db, token.strip())
        if found is None:
            raise Refused(401, "the token is unknown or revoked; ask an admin for a new one")
        return found

    def page_user(request: Request) -> auth.User | Response:
        """A page's user, or the redirect that turns its ?token= into a cookie."""
        token = request.scope.get(_QUERY_TOKEN)
        if token is None:
            return user(request)
        if auth.verify(db, token) is None:
            raise Refused(401, "the token is unknown or revoked; ask an admin for a new one")
        query = request.url.query
        moved = Response(
            status_code=303, headers={"Location": request.url.path + (f"?{query}" if query else "")}
        )
        moved.set_cookie(
            COOKIE,
            token,
            max_age=COOKIE_MAX_AGE_S,
            httponly=True,
            samesite="lax",  # sent when a link from elsewhere opens a page: reads only
            secure=request.url.scheme == "https",
        )
        moved.headers["Cache-Control"] = "no-store"
        return moved

    def sweep_row(text: str) -> dict[str, Any]:
        try:
            sweep_id = int(text)
        except ValueError:
            raise Refused(404, f"no sweep {text!r}: sweep ids are numbers") from None
        with db.connect() as conn:
            row = conn.execute(sa.select(schema.sweeps).where(schema.sweeps.c.id == sweep_id))
            found = row.mappings().first()
        if found is None:
            raise Refused(404, f"no sweep {sweep_id}; python -m raygpt.service list shows them")
        return dict(found)

    def totals() -> dict:
        try:
            return runner.cluster()[1]
        except Exception as err:
            raise Refused(
                503,
                f"cannot read the cluster's resources ({redact(first_line(err))}); check that Ray runs (ray status)",
            ) from None

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/sweeps", status_code=201)
    async def post_sweep(request: Request) -> JSONResponse:
        owner = await run_in_threadpool(user, request)
        body = await submit.read_body(request)
        made = await run_in_threadpool(submit.submit, db, store, owner, body, totals)
        _wake(runner)
        return JSONResponse(made, status_code=201)

    @app.get("/sweeps")
    def list_sweeps(
        request: Request, owner: str | None = None, status: str | None = None, limit: int = 200
    ) -> JSONResponse:
        user(request)
        # JSONResponse at once: FastAPI's own encoding of the dicts doubles the time.
        return JSONResponse(
            _json({"sweeps": [_summary(r) for r in _sweeps(db, owner, status, limit)]})
        )

    @app.get("/sweeps/{sweep_id}")
    def show(request: Request, sweep_id: str) -> dict:
        user(request)
        return _json(_shown(sweep_row(sweep_id)))

    @app.post("/sweeps/{sweep_id}/cancel")
    def cancel(request: Request, sweep_id: str) -> dict:
        return _cancel(db, runner, user(request), sweep_row(sweep_id))

    @app.get("/sweeps/{sweep_id}/logs", response_class=PlainTextResponse)
    def logs(request: Request, sweep_id: str, offset: int = 0) -> PlainTextResponse:
        user(request)
        row = sweep_row(sweep_id)
        text = ""
        if row["ray_job_id"]:
            try:
                text = runner.job_logs(row["ray_job_id"])
            except Exception as err:
                raise Refused(
                    503, f"cannot read sweep {row['id']}'s log: {redact(first_line(err))}"
                ) from None
        return PlainTextResponse(redact(text[max(0, offset) :]))

    @app.get("/trials")
    def trials(request: Request) -> JSONResponse:
        user(request)
        pairs = request.query_params.multi_items()
        limit = _limit([v for k, v in pairs if k == "limit"])
        rows = index.query_trials(db, [(k, v) for k, v in pairs if k != "limit"], limit=limit + 1)
        return JSONResponse(_json({"trials": rows[:limit], "truncated": len(rows) > limit}))

    @app.get("/lr-law")
    def lr_law(request: Request) -> JSONResponse:
        user(request)
        return JSONResponse(_json(law.answer(db, request.query_params.multi_items())))

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        signed = page_user(request)
        if isinstance(signed, Response):
            return signed
        rows = [_listed(r) for r in _sweeps(db, None, None, 500)]
        return _html(pages.render_sweep_list(rows, time.time()))

    @app.get("/sweeps/{sweep_id}/page", response_class=HTMLResponse)
    def page(request: Request, sweep_id: str) -> Response:
        signed = page_user(request)
        if isinstance(signed, Response):
            return signed
        row = sweep_row(sweep_id)
        with db.connect() as conn:
            query = sa.select(schema.trials).where(schema.trials.c.sweep_id == row["id"])
            found = conn.execute(query.order_by(schema.trials.c.trial_id)).mappings().all()
        shown = [dict(t, final_val_loss=t["val_loss"]) for t in found]
        plots = [f"/sweeps/{row['id']}/plots/{n}" for n in _plots(row)]
        return _html(pages.render_sweep_page(_paged(row), shown, plots, time.time()))

    @app.get("/sweeps/{sweep_id}/plots/{name}")
    def plot(request: Request, sweep_id: str, name: str) -> Response:
        user(request)
        row = sweep_row(sweep_id)
        if name not in _plots(row):
            raise Refused(404, f"sweep {row['id']} has no plot {name!r}")
        folder = storage.resolve(row["folder_uri"], check=False)
        return Response(folder.read_bytes(folder.path(name)), media_type="image/png")

    return app


def _wake(runner: Runner) -> None:
    try:
        runner.wake()
    except Exception as err:  # the row is in: the queue's next round starts it
        log.warning("could not wake the queue: %s", redact(first_line(err)))


# --------------------------------------------------------------------------- cancel


def _cancel(db: sa.Engine, runner: Runner, owner: auth.User, row: dict[str, Any]) -> dict:
    """Cancel a sweep of `owner`'s: a queued one at once, a running one once its job has
    stopped. A running sweep without a job yet is marked so; the queue starts no
    cancelled sweep."""
    if row["owner"] != owner.name:
        raise Refused(
            403, f"sweep {row['id']} is {row['owner'] or 'nobody'}'s; only its owner cancels it"
        )
    sweeps = schema.sweeps
    for _ in range(3):  # the queue may start it between the read and the write
        if row["status"] in schema.ENDED:
            raise Refused(409, f"sweep {row['id']} has ended ({row['status']}); nothing to cancel")
        was = [row["status"]]
        if row["status"] == schema.RUNNING and row["ray_job_id"]:
            try:
                runner.stop_job(row["ray_job_id"])
            except Exception as err:
                raise Refused(
                    503, f"could not stop sweep {row['id']}'s job: {redact(first_line(err))}"
                ) from None
            # how the queue may have recorded the stopped job meanwhile
            was += [schema.FAILED, schema.CANCELLED]
        with db.begin() as conn:
            done = conn.execute(
                sa.update(sweeps)
                .where(sweeps.c.id == row["id"], sweeps.c.status.in_(was))
                .values(status=schema.CANCELLED, ended_at=time.time(), queued_reason=None)
            )
            if done.rowcount == 1:
                log.info("sweep %d cancelled by %s", row["id"], owner.name)
                _wake(runner)
                return {"id": row["id"], "name": row["name"], "status": schema.CANCELLED}
            row = dict(
                conn.execute(sa.select(sweeps).where(sweeps.c.id == row["id"])).mappings().one()
            )
    raise Refused(409, f"sweep {row['id']} keeps changing status ({row['status']}); try again")


# --------------------------------------------------------------------------- reading


def _sweeps(db: sa.Engine, owner: str | None, status: str | None, limit: int) -> list[dict]:
    sweeps = schema.sweeps
    # A list never shows a sweep's files, experiment or flags (up to MBs a sweep), and the
    # list page reads it every few seconds while a sweep is active.
    listed = [c for c in sweeps.c if c.name not in ("files", "experiment_toml", "flags")]
    query = sa.select(*listed).order_by(sweeps.c.id.desc()).limit(_limit([str(limit)]))
    if owner:
        query = query.where(sweeps.c.owner == owner)
    if status:
        if status not in schema.SWEEP_STATUSES:
            raise Refused(
                400, f"status {status!r} is unknown; give one of {', '.join(schema.SWEEP_STATUSES)}"
            )
        query = query.where(sweeps.c.status == status)
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def _limit(values: list[str], most: int = 10_000) -> int:
    try:
        limit = int(values[-1]) if values else most
    except ValueError:
        raise Refused(400, f"limit={values[-1]!r} is not a whole number") from None
    if limit < 1:
        raise Refused(400, f"limit={limit} must be >= 1")
    return min(limit, most)


_SUMMARY = ("id", "name", "owner", "status", "queued_reason", "submitted_at", "started_at", "ended_at",
            "n_trials", "best_val_loss", "gpu_hours", "steps_trained", "steps_planned")  # fmt: skip


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in _SUMMARY} | {"page": f"/sweeps/{row['id']}/page"}


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """A sweep's row for GET /sweeps/{id}: the files by name only, secrets masked."""
    shown = {k: v for k, v in row.items() if k != "files"}
    shown["files"] = sorted(row["files"] or {})
    shown["experiment_toml"] = redact(row["experiment_toml"]) if row["experiment_toml"] else None
    shown["flags"] = [redact(f) for f in row["flags"] or []]
    shown["page"] = f"/sweeps/{row['id']}/page"
    return shown


def _listed(row: dict[str, Any]) -> dict[str, Any]:
    """A sweep's row as pages.render_sweep_list reads it."""
    params = (row["best_config"] or {}).get("params") or {}
    return {
        **_paged(row),
        "url": f"/sweeps/{row['id']}/page",
        "steps_done": row["steps_trained"],
        "steps_planned": row["steps_planned"],
        "best_val_loss": row["best_val_loss"],
        "best_optimizer": params.get("optimizer"),
        "best_learning_rate": params.get("learning_rate"),
        "gpu_hours": row["gpu_hours"],
    }


def _paged(row: dict[str, Any]) -> dict[str, Any]:
    """A sweep's row as pages.render_sweep_page reads it."""
    settings = row["settings"] or {}
    return {
        "id": row["id"],
        "name": row["name"],
        "owner": row["owner"],
        "status": row["status"],
        "reason": row["queued_reason"],
        "started_at": row["started_at"],
        "finished_at": row["ended_at"],
        "total_trials": index.planned_search_trials(settings) if settings else None,
        "max_steps": (row["config"] or {}).get("max_steps"),
    }


def _plots(row: dict[str, Any]) -> list[str]:
    """The PNGs at the top of a sweep's folder ([] before it exists or when unreadable)."""
    if row["status"] == schema.QUEUED or not row["folder_uri"]:
        return []
    try:
        folder = storage.resolve(row["folder_uri"], check=False)
        return [n for n in folder.list_dir(folder.root) if _PLOT.fullmatch(n)]
    except (OSError, UserError) as err:
        log.warning("cannot list sweep %s's plots: %s", row["id"], redact(first_line(err)))
        return []


def _json(value: Any) -> Any:
    """`value` with every non-finite float (a diverged trial's loss) as null: JSON has none."""
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _html(text: str) -> HTMLResponse:
    return HTMLResponse(
        text, headers={"Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": " ".join(str(message).split())}, status_code=status, headers=headers
    )


class _TakeQueryToken:
    """Takes `token` out of a request's query string before anything reads it (the access
    log prints the query), and keeps it in the request's scope for the page routes."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if b"token" in query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            tokens = [v for k, v in pairs if k == "token"]
            if tokens:
                # The scope is the server's own dict: its access log sees the query without it.
                scope["query_string"] = urlencode(
                    [(k, v) for k, v in pairs if k != "token"]
                ).encode()
                scope[_QUERY_TOKEN] = tokens[-1]
        await self.app(scope, receive, send)
