"""The service's HTTP API (raygpt/service/app.py and submit.py) through Starlette's
TestClient, on SQLite and on a real PostgreSQL server: a submission is checked as
`python -m raygpt.sweep` checks it and queued with its demand, a bad one is one line and
queues nothing, every route but /healthz wants a live token, only a sweep's owner cancels
it, and the pages take a token once as a cookie. No Ray: the runner below has fixed
cluster totals and starts no job."""

from __future__ import annotations

import json
import re

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from service_http import FixedCluster

from raygpt.service import auth
from raygpt.service import db as schema
from raygpt.service import submit as submission
from raygpt.service.app import COOKIE, build_app
from raygpt.service.submit import EXPERIMENT_FILE

EXPERIMENT = """
data_file = "data_file/input.txt"
max_steps = 20
eval_interval = 10

[sweep]
optimizers = ["adamw", "sgd"]
num_samples = 4
workers_per_trial = 2
"""
TEXT = "hello raygpt service\n" * 50


@pytest.fixture
def runner() -> FixedCluster:
    return FixedCluster({"CPU": 16.0, "GPU": 0.0})


@pytest.fixture
def service(db, runner, tmp_path):
    """(client, ada's token, bob's token, storage root): ada may hold 8 CPUs, bob 2."""
    ada = auth.add_user(db, "ada", gpu_quota=0, cpu_quota=8)
    bob = auth.add_user(db, "bob", gpu_quota=0, cpu_quota=2)
    root = tmp_path / "results"
    with TestClient(build_app(db, runner, str(root))) as client:
        yield client, ada, bob, root


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(client, token, flags=(), experiment=EXPERIMENT, files=None):
    files = {"data_file/input.txt": TEXT} if files is None else files
    body = {"experiment_toml": experiment, "flags": list(flags), "files": files}
    return client.post("/sweeps", headers=bearer(token), json=body)


def rows(db) -> list[dict]:
    with db.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(schema.sweeps)).mappings()]


def one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


def test_a_submission_is_queued_with_its_demand_and_wakes_the_queue(db, runner, service):
    client, ada, _, root = service
    made = submit(client, ada, ["--name", "team-a", "--cpus-per-worker", "1.5"])
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    assert made.json() == {
        "id": sid,
        "name": "team-a",
        "status": "queued",
        "page": f"/sweeps/{sid}/page",
    }
    assert runner.woken == 1
    [row] = rows(db)
    assert row["owner"] == "ada" and row["status"] == schema.QUEUED and row["submitted_at"] > 0
    assert row["storage_path"] == str(root) and row["folder_uri"] == str(root / "team-a")
    assert row["experiment_toml"] == EXPERIMENT
    assert row["flags"] == ["--name", "team-a", "--cpus-per-worker", "1.5"]
    assert row["files"] == {"data_file/input.txt": TEXT}
    # 2 workers x 1.5 CPUs a trial; 8 CPUs of quota fit 2 trials (the cluster's 16 fit 5).
    assert (row["workers_per_trial"], row["cpus_per_worker"], row["gpus_per_worker"]) == (2, 1.5, 0)
    assert row["max_concurrent_trials"] == 2
    shown = client.get(f"/sweeps/{sid}", headers=bearer(ada)).json()
    assert shown["files"] == ["data_file/input.txt"] and shown["owner"] == "ada"
    listed = client.get("/sweeps", headers=bearer(ada)).json()["sweeps"]
    assert [(s["id"], s["name"], s["status"]) for s in listed] == [(sid, "team-a", "queued")]
    assert client.get(f"/sweeps/{sid}/logs", headers=bearer(ada)).text == ""  # no job yet


def test_the_files_are_where_the_flags_say(service):
    """The check runs in a folder holding the files: without the data file it fails as
    `python -m raygpt.sweep` would, with the path the experiment gives."""
    client, ada, _, _ = service
    said = one_line_error(submit(client, ada, ["--name", "x"], files={}), 400)
    assert said.startswith("data file data_file/input.txt does not exist")
    moved = EXPERIMENT.replace("data_file/input.txt", "corpus.txt")
    assert submit(client, ada, ["--name", "x"], moved, {"corpus.txt": TEXT}).status_code == 201


@pytest.mark.parametrize(
    "flags, experiment, files, status, said",
    [
        ([], "max_steps = [", None, 400, r"^experiment file experiment.toml is not valid TOML"),
        ([], EXPERIMENT + "colour = 3\n", None, 400, r"^unknown config key 'colour' in \[sweep\] of experiment.toml"),
        (["--nmae", "x"], EXPERIMENT, None, 400, r"^unknown flag --nmae; did you mean --name\?$"),
        (["--learning-rate", "-1"], EXPERIMENT, None, 400, r"learning_rate"),
        (["--storage-path", "/elsewhere"], EXPERIMENT, None, 400, r"^--storage-path is not for"),
        (["--stor", "/elsewhere"], EXPERIMENT, None, 400, r"^--storage-path is not for"),
        (["--address", "auto"], EXPERIMENT, None, 400, r"^--address is not for"),
        (["--resume"], EXPERIMENT, None, 400, r"^--resume is not for.*nothing to resume"),
        (["--overwrite"], EXPERIMENT, None, 400, r"^--overwrite is not for"),
        (["--service", "http://x"], EXPERIMENT, None, 400, r"^--service is not for"),
        (["--transfer", "n_embd=64,128"], EXPERIMENT, None, 400, r"^--transfer is not for"),
        ([], EXPERIMENT + "resume = true\n", None, 400, r"^the experiment sets resume"),
        (["exp.toml"], EXPERIMENT, None, 400, r"send the experiment file's text as experiment_toml"),
        (["--help"], EXPERIMENT, None, 400, r"^flags hold --help"),
        ([], EXPERIMENT, {"../up.txt": "x"}, 400, r"must be a relative path"),
        ([], EXPERIMENT, {"/abs.txt": "x"}, 400, r"must be a relative path"),
        ([], EXPERIMENT, {EXPERIMENT_FILE: "x"}, 400, r"must be a relative path"),
        (["--max-concurrent-trials", "5"], EXPERIMENT, None, 400, r"over ada's quota of 8 CPUs; lower --max-concurrent-trials to 4"),
        (["--use-gpu", "true"], EXPERIMENT, None, 400, r"one trial of this sweep needs 2 GPUs, over ada's quota of 0 GPUs"),
        (["--gpus-per-trial", "0.5", "--workers-per-trial", "1"], EXPERIMENT, None, 400, r"^--gpus-per-trial 0.5 but the cluster has no GPU"),
        (["--mlflow", "http://bob:hunter2@127.0.0.1:5000"], EXPERIMENT, None, 400, r"^a flag holds a credential \(--mlflow|^a flag holds a credential \(http://bob:\*\*\*@"),
        ([], EXPERIMENT + 'mlflow = "http://bob:hunter2@127.0.0.1:5000"\n', None, 400, r"^the experiment file holds a credential \(its text\)"),
    ],
)  # fmt: skip
def test_a_bad_submission_is_one_line_and_queues_nothing(
    db, runner, service, flags, experiment, files, status, said
):
    client, ada, _, _ = service
    got = one_line_error(submit(client, ada, flags, experiment, files), status)
    assert re.search(said, got), got
    assert "hunter2" not in got
    assert rows(db) == [] and runner.woken == 0


@pytest.mark.parametrize(
    "body, said",
    [
        (b"not json", r"^the body is not JSON"),
        (b"[1, 2]", r"^the body must be a JSON object"),
        (b'{"flags": [], "colour": 1}', r"^unknown field 'colour'"),
        (b'{"flags": "--name x"}', r"^flags must be a list of strings"),
        (b'{"files": {"a.txt": 3}}', r"^files must map relative paths to their text"),
        (b'{"experiment_toml": 7}', r"^experiment_toml must be"),
    ],
)
def test_a_malformed_body_is_one_line(db, service, body, said):
    client, ada, _, _ = service
    response = client.post("/sweeps", headers=bearer(ada), content=body)
    assert re.search(said, one_line_error(response, 400))
    assert rows(db) == []


def test_a_taken_name_is_refused(db, service):
    client, ada, bob, root = service
    assert submit(client, ada, ["--name", "taken"]).status_code == 201
    said = one_line_error(submit(client, bob, ["--name", "taken", "--workers-per-trial", "1"]), 409)
    assert said == "sweep name 'taken' is taken (sweep 1); choose another --name"
    (root / "on-disk").mkdir(parents=True)  # a sweep the database has not seen
    said = one_line_error(submit(client, ada, ["--name", "on-disk"]), 409)
    assert said == f"{root / 'on-disk'} exists already; choose another --name"
    assert [r["name"] for r in rows(db)] == ["taken"]


def test_every_route_but_healthz_wants_a_live_token(db, service):
    client, ada, _, _ = service
    assert client.get("/healthz").json() == {"ok": True}
    assert submit(client, ada, ["--name", "s"]).status_code == 201
    auth.add_user(db, "carol")
    carol = auth.issue_token(db, "carol")
    auth.revoke(db, "carol")
    routes = [("GET", "/sweeps"), ("GET", "/sweeps/1"), ("GET", "/sweeps/1/logs"),
              ("GET", "/trials"), ("GET", "/"), ("GET", "/sweeps/1/page"),
              ("POST", "/sweeps/1/cancel"), ("POST", "/sweeps")]  # fmt: skip
    for method, path in routes:
        for headers in ({}, bearer("x" * 43), bearer(carol), {"Authorization": f"Basic {ada}"}):
            response = client.request(method, path, headers=headers)
            said = one_line_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
            assert carol not in said and ada not in said
        assert client.request(method, path, headers=bearer(ada)).status_code != 401
    assert rows(db)[0]["status"] == schema.CANCELLED  # the live token did cancel it


def test_only_the_owner_cancels_and_an_ended_sweep_stays_ended(db, runner, service):
    client, ada, bob, _ = service
    sid = submit(client, ada, ["--name", "mine"]).json()["id"]
    said = one_line_error(client.post(f"/sweeps/{sid}/cancel", headers=bearer(bob)), 403)
    assert said == f"sweep {sid} is ada's; only its owner cancels it"
    assert rows(db)[0]["status"] == schema.QUEUED and runner.woken == 1
    done = client.post(f"/sweeps/{sid}/cancel", headers=bearer(ada))
    assert done.json() == {"id": sid, "name": "mine", "status": "cancelled"}
    [row] = rows(db)
    assert row["status"] == schema.CANCELLED and row["ended_at"] >= row["submitted_at"]
    assert runner.woken == 2  # the queue hears of the freed place
    said = one_line_error(client.post(f"/sweeps/{sid}/cancel", headers=bearer(ada)), 409)
    assert said == f"sweep {sid} has ended (cancelled); nothing to cancel"
    assert one_line_error(client.post("/sweeps/99/cancel", headers=bearer(ada)), 404)


def test_a_page_takes_the_token_once_and_keeps_it_in_a_cookie(service):
    client, ada, _, _ = service
    sid = submit(client, ada, ["--name", "paged"]).json()["id"]
    one_line_error(client.get("/", params={"token": "wrong"}, follow_redirects=False), 401)
    moved = client.get(f"/sweeps/{sid}/page", params={"token": ada}, follow_redirects=False)
    assert moved.status_code == 303 and moved.headers["location"] == f"/sweeps/{sid}/page"
    cookie = moved.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={ada};") and "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower() and moved.headers["cache-control"] == "no-store"
    assert client.cookies.get(COOKIE) == ada  # the browser keeps it ...
    page = client.get(f"/sweeps/{sid}/page")  # ... and sends it
    assert page.status_code == 200 and "<h1>paged</h1>" in page.text and ada not in page.text
    assert 'id="live" data-refresh=' in page.text  # a queued sweep's page refreshes
    home = client.get("/")
    assert home.status_code == 200 and f'href="/sweeps/{sid}/page"' in home.text
    assert client.get("/sweeps").status_code == 200  # a GET reads with the cookie
    said = one_line_error(client.post(f"/sweeps/{sid}/cancel"), 401)  # but cannot write
    assert said == "a browser's cookie only reads; send Authorization: Bearer TOKEN"
    said = one_line_error(client.get("/sweeps", params={"token": ada}), 400)
    assert said.startswith("?token= is for the web pages only")


def _trial(sweep_id, trial_id, optimizer, n_params, best, tokens=1000):
    return {"sweep_id": sweep_id, "trial_id": trial_id, "optimizer": optimizer,
            "learning_rate": 0.01, "params": {"optimizer": optimizer}, "status": "completed",
            "n_params": n_params, "best_val_loss": best, "val_loss": best, "tokens": tokens}  # fmt: skip


def test_trials_are_queried_by_filter(db, service):
    client, ada, _, _ = service
    sid = submit(client, ada, ["--name", "indexed"]).json()["id"]
    with db.begin() as conn:
        conn.execute(sa.insert(schema.trials), [
            _trial(sid, "t1", "muon", 150_000_000, 3.1),
            _trial(sid, "t2", "muon", 50_000_000, 3.4),
            _trial(sid, "t3", "adamw", 150_000_000, float("inf"), tokens=5000),
        ])  # fmt: skip

    def ids(query: str) -> list[str]:
        response = client.get(f"/trials?{query}", headers=bearer(ada))
        assert response.status_code == 200, response.text
        return [t["trial_id"] for t in response.json()["trials"]]

    assert ids("optimizer=muon&n_params=1e8:2e8") == ["t1"]
    assert ids("n_params=1e8:") == ["t1", "t3"]
    assert ids("tokens=2000:") == ["t3"]  # "tokens" is a filter, not the sign-in token
    assert ids("sweep=indexed&owner=ada&optimizer=adamw&optimizer=muon") == ["t1", "t2", "t3"]
    found = client.get("/trials?limit=2", headers=bearer(ada)).json()
    assert [t["trial_id"] for t in found["trials"]] == ["t1", "t2"] and found["truncated"]
    [diverged] = client.get("/trials?optimizer=adamw", headers=bearer(ada)).json()["trials"]
    assert diverged["best_val_loss"] is None and diverged["owner"] == "ada"  # inf: no JSON number
    said = one_line_error(client.get("/trials?optimiser=muon", headers=bearer(ada)), 400)
    assert said.startswith("unknown filter 'optimiser' (did you mean 'optimizer'?)")
    said = one_line_error(client.get("/trials?n_params=2e8:1e8", headers=bearer(ada)), 400)
    assert "LO 2e+08 is above HI 1e+08" in said


def test_refusals_name_what_to_do(db, service):
    client, ada, _, _ = service
    said = one_line_error(client.get("/sweeps/abc", headers=bearer(ada)), 404)
    assert said == "no sweep 'abc': sweep ids are numbers"
    said = one_line_error(client.get("/sweeps/7", headers=bearer(ada)), 404)
    assert said == "no sweep 7; python -m raygpt.service list shows them"
    said = one_line_error(client.get("/sweeps?status=done", headers=bearer(ada)), 400)
    assert said.startswith("status 'done' is unknown")
    said = one_line_error(client.get("/nowhere", headers=bearer(ada)), 404)
    assert said == "no route GET /nowhere; see docs/service.md"
    assert json.loads(client.get("/sweeps", headers=bearer(ada)).text) == {"sweeps": []}


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(db, service, monkeypatch):
    client, ada, _, _ = service
    monkeypatch.setattr(submission, "MAX_BODY_BYTES", 1000)
    response = submit(client, ada, ["--name", "big"], files={"data_file/input.txt": "x" * 2000})
    assert one_line_error(response, 413).startswith("the submission is over")
    assert rows(db) == []
