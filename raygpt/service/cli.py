"""`python -m raygpt.service COMMAND`: run the team service, manage its users, and read
and cancel its sweeps (docs/service.md).

- On the head, on the database directly: `add-user`, `issue-token`, `revoke`; and the
  service itself on the cluster: `start`, `stop`, `status` (raygpt.service.deployment,
  imported by those commands only: parsing and the other commands import no Ray).
- From anywhere that reaches the service (`--service URL` or $RAYGPT_SERVICE, `--token`
  or $RAYGPT_TOKEN): `list`, `show`, `cancel`, `logs`, `query`, and `lr-law` (the
  learning-rate law of the trials a filter selects; with `--db`, read from the database
  directly).

A token is printed once, by `add-user` and `issue-token`, alone on stdout (so
`TOKEN=$(python -m raygpt.service add-user ada)` holds just it), and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from raygpt.config.io import OneLineArgumentParser
from raygpt.config.train import default_storage_path
from raygpt.errors import UserError, exit_on_user_error
from raygpt.redact import redact
from raygpt.sweep.remote import SERVICE_ENV, TOKEN_ENV

DEFAULT_HOST = "127.0.0.1"  # loopback: reach it through ssh -L, as the dashboard
DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.service",
        description="The team tuning service: sweeps queued under per-user quotas on one "
        "cluster, one database of every sweep and trial, and a web page over it.",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineArgumentParser
    )
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--db",
        metavar="URL",
        help="the service's database: a SQLite file (default ~/.raygpt/service.db) or "
        "postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
    )
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--service", metavar="URL", help=f"the service (default: ${SERVICE_ENV})")
    remote.add_argument(
        "--token", metavar="TOKEN", help=f"your API token (default: ${TOKEN_ENV}, safer)"
    )

    add = commands.add_parser(
        "add-user", parents=[database], help="add a user; prints their token, once"
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--gpu-quota", type=_number("--gpu-quota"), default=None, metavar="G")
    add.add_argument("--cpu-quota", type=_number("--cpu-quota"), default=None, metavar="C")
    add.add_argument("--priority", type=_integer("--priority"), default=None, metavar="P")
    issue = commands.add_parser(
        "issue-token", parents=[database], help="another token for a user; printed once"
    )
    issue.add_argument("name", metavar="NAME")
    revoke = commands.add_parser("revoke", parents=[database], help="revoke a user's tokens")
    revoke.add_argument("name", metavar="NAME")

    start = commands.add_parser("start", parents=[database], help="run the service (the head)")
    start.add_argument(
        "--storage-path",
        default=None,
        metavar="PATH",
        help="where the sweeps write (default: $RAYGPT_STORAGE_PATH or ~/ray_results)",
    )
    start.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    start.add_argument("--port", type=_integer("--port"), default=DEFAULT_PORT)
    start.add_argument(
        "--rebuild", action="store_true", help="index every sweep folder under the storage first"
    )
    commands.add_parser("stop", help="stop the service (running sweeps go on)")
    commands.add_parser("status", help="whether the service runs, where, and its queue")

    listing = commands.add_parser("list", parents=[remote], help="the sweeps, newest first")
    listing.add_argument("--owner", metavar="NAME")
    listing.add_argument("--status", metavar="STATUS")
    for name, what in (("show", "one sweep"), ("cancel", "cancel a sweep"), ("logs", "its log")):
        sub = commands.add_parser(name, parents=[remote], help=what)
        sub.add_argument("id", type=_integer("sweep id"), metavar="ID")
    query = commands.add_parser("query", parents=[remote], help="trials by filter")
    query.add_argument("filters", nargs="+", metavar="KEY=VALUE")
    query.add_argument("--limit", type=_integer("--limit"), default=None, metavar="N")
    law = commands.add_parser(
        "lr-law",
        parents=[remote],
        help="fit best lr = a * N^alpha * D^beta per optimizer over the trials a filter "
        "selects, as python -m raygpt.report --lr-law does over sweep folders",
    )
    law.add_argument("filters", nargs="*", metavar="KEY=VALUE")
    law.add_argument(
        "--predict",
        metavar="N=...,D=...",
        help="the law's lr at this size, e.g. N=124M,D=2.5e9 (refused far outside the "
        "fitted range)",
    )
    law.add_argument(
        "--extrapolate", action="store_true", help="with --predict: predict far outside it"
    )
    law.add_argument(
        "--out", default=".", metavar="DIR", help="folder for lr_law.json and lr_law.png"
    )
    law.add_argument(
        "--db",
        metavar="URL",
        help="read this database directly (on the head: a SQLite file or "
        "postgresql://...) instead of asking the service",
    )
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


# --------------------------------------------------------------------------- the database


def _add_user(args: argparse.Namespace) -> int:
    from raygpt.service import auth, db

    given = {"gpu_quota": args.gpu_quota, "cpu_quota": args.cpu_quota, "priority": args.priority}
    engine = db.connect(args.db)
    token = auth.add_user(engine, args.name, **{k: v for k, v in given.items() if v is not None})
    user = auth.get_user(engine, args.name)
    _note(
        f"user {user.name} added ({_count(user.gpu_quota, 'GPU')} and "
        f"{_count(user.cpu_quota, 'CPU')} at once, priority {user.priority}); their token, "
        "shown this once, is on stdout"
    )
    print(token, flush=True)
    return 0


def _issue_token(args: argparse.Namespace) -> int:
    from raygpt.service import auth, db

    token = auth.issue_token(db.connect(args.db), args.name)
    _note(f"a new token for {args.name}, shown this once, is on stdout")
    print(token, flush=True)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from raygpt.service import auth, db

    n = auth.revoke(db.connect(args.db), args.name)
    print(f"revoked {n} token(s) of {args.name}; issue-token gives them a new one")
    return 0


# --------------------------------------------------------------------------- the service


def _start(args: argparse.Namespace) -> int:
    from raygpt.service import deployment  # Ray Serve: only to run the service

    if args.host not in LOOPBACK:
        _note(
            f"warning: --host {args.host} serves the service beyond this machine; anyone "
            "who reaches it can try tokens: prefer the default and ssh -L"
        )
    storage_path = args.storage_path or default_storage_path()
    url = deployment.start(storage_path, args.db, args.host, args.port, args.rebuild)
    print(f"[service] running at {url}", flush=True)
    print(
        f"[service] from your machine: ssh -L {args.port}:localhost:{args.port} HEAD, then "
        f"export {SERVICE_ENV}=http://127.0.0.1:{args.port}",
        flush=True,
    )
    return 0


def _stop(_args: argparse.Namespace) -> int:
    from raygpt.service import deployment

    deployment.stop()
    print("[service] stopped; running sweeps go on, and the next start takes them up")
    return 0


def _status(_args: argparse.Namespace) -> int:
    from raygpt.service import deployment

    for key, value in deployment.status().items():
        print(f"{key}: {redact(str(value))}")
    return 0


# --------------------------------------------------------------------------- the client


def _client(args: argparse.Namespace) -> Any:
    from raygpt.service.client import Client

    return Client.from_flags(args.service, args.token)


def _list(args: argparse.Namespace) -> int:
    sweeps = _client(args).sweeps(args.owner, args.status)
    header = ["id", "name", "owner", "status", "trials", "best val", "GPU-h", "submitted"]
    rows = [
        [
            s["id"],
            s["name"],
            s["owner"],
            s["status"] + (f" ({s['queued_reason']})" if s.get("queued_reason") else ""),
            s["n_trials"],
            _num(s["best_val_loss"], ".4f"),
            _num(s["gpu_hours"], ".2f"),
            _when(s["submitted_at"]),
        ]
        for s in sweeps
    ]
    print(_table(header, rows) if rows else "no sweeps")
    return 0


def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).sweep(args.id), indent=2, sort_keys=True))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    done = _client(args).cancel(args.id)
    print(f"sweep {done['id']} ({done['name']}) {done['status']}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = _client(args)
    text = client.logs(args.id)
    if text:
        sys.stdout.write(text)
        return 0
    sweep = client.sweep(args.id)
    why = f": {sweep['queued_reason']}" if sweep.get("queued_reason") else ""
    _note(f"sweep {args.id} has no log yet ({sweep['status']}{why})")
    return 0


TRIAL_COLUMNS = ("sweep", "trial_id", "optimizer", "learning_rate", "status", "steps")
TRIAL_NUMBERS = {"val_loss": ".4f", "best_val_loss": ".4f", "n_params": ",.0f"}


def _filters(words: list[str]) -> list[tuple[str, str]]:
    filters = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UserError(f"filter {word!r} has no '='; give NAME=VALUE, e.g. optimizer=muon")
        filters.append((key, value))
    return filters


def _query(args: argparse.Namespace) -> int:
    filters = _filters(args.filters)
    if args.limit is not None:
        filters.append(("limit", str(args.limit)))
    found = _client(args).trials(filters)
    rows = [
        [_num(t[k], ".3g") if k == "learning_rate" else t[k] for k in TRIAL_COLUMNS]
        + [_num(t[k], fmt) for k, fmt in TRIAL_NUMBERS.items()]
        for t in found["trials"]
    ]
    print(_table([*TRIAL_COLUMNS, *TRIAL_NUMBERS], rows) if rows else "no trials match")
    if found["truncated"]:
        _note(f"showing the first {len(rows)} trials; narrow the filters or raise --limit")
    return 0


def _lr_law(args: argparse.Namespace) -> int:
    from raygpt.service import law  # the fit's numpy and plots: only for this command

    query = _filters(args.filters)
    query += [("predict", args.predict)] if args.predict is not None else []
    query += [("extrapolate", "1")] if args.extrapolate else []
    if args.db is None:
        found = _client(args).lr_law(query)
    elif args.service or args.token:
        raise UserError("--db reads the database itself: leave out --service and --token")
    else:
        from raygpt.service import db

        engine = db.connect(args.db)
        try:
            found = law.answer(engine, query)
        finally:
            engine.dispose()
    written = law.write(args.out, found)
    print("\n".join(found["lines"]))
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {
    "add-user": _add_user,
    "issue-token": _issue_token,
    "revoke": _revoke,
    "start": _start,
    "stop": _stop,
    "status": _status,
    "list": _list,
    "show": _show,
    "cancel": _cancel,
    "logs": _logs,
    "query": _query,
    "lr-law": _lr_law,
}


# --------------------------------------------------------------------------- pieces


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [list(header)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}{'' if n == 1 else 's'}"


def _num(value: Any, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _when(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _number(flag: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None

    return parse


def _integer(what: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a whole number") from None

    return parse
