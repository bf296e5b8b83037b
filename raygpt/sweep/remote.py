"""`python -m raygpt.sweep ... --service URL`: a sweep that passed its checks here, sent to
the team service (docs/service.md) instead of running in this shell: the experiment's
text, the flags, and the files that --data-file and --hellaswag-file name. `--follow`
then prints the sweep's driver log as it grows, until the sweep ends.

The one request function to the service (`service_request`, on the standard library)
lives here, not in raygpt.service.client, which builds on it: service sits above sweep
in the layers, so the sweep command may not import it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raygpt.config.train import TrainConfig
from raygpt.errors import UserError, first_line
from raygpt.redact import redact

# --service and its companions: where the sweep goes, not what it is.
SERVICE_ENV, TOKEN_ENV = "RAYGPT_SERVICE", "RAYGPT_TOKEN"
SERVICE_KEYS = ("service", "token", "follow")
# TrainConfig keys that name a local file: a submission sends the file's text, and its flag
# names the copy by a path relative to the folder the service runs the sweep in.
FILE_KEYS = ("data_file", "hellaswag_file")
MAX_FILES_BYTES = 16 << 20  # a submission's files in all; larger data belongs on shared storage
FOLLOW_S = 5.0  # --follow polls the service this often
ENDED = ("succeeded", "failed", "cancelled")  # the service's ended statuses (service/db.py)


def service_options(args: dict[str, Any]) -> tuple[str, str, bool] | None:
    """(service URL, token, follow) when the sweep goes to a service, else None."""
    url = service_url(args.get("service"))
    if url is None:
        for key in ("token", "follow"):
            if key in args:
                raise UserError(
                    f"--{key} goes with --service URL (or ${SERVICE_ENV}); add it, or drop --{key}"
                )
        return None
    return url, service_token(args.get("token")), bool(args.get("follow"))


def service_url(given: str | None) -> str | None:
    """The service's base URL from --service, else $RAYGPT_SERVICE; None where both are
    unset or empty (the sweep runs here)."""
    url = (os.environ.get(SERVICE_ENV, "") if given is None else given).strip()
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise UserError(
            f"--service {redact(url)} is not an http:// or https:// URL; give the service's "
            "address, e.g. http://127.0.0.1:8000 through ssh -L (docs/service.md)"
        )
    return url.rstrip("/")


def service_token(given: str | None) -> str:
    """The API token from --token, else $RAYGPT_TOKEN."""
    token = (given or os.environ.get(TOKEN_ENV) or "").strip()
    if not token:
        raise UserError(
            f"the service needs your API token: set ${TOKEN_ENV} (or give --token); an admin "
            "prints one with python -m raygpt.service add-user NAME"
        )
    return token


def submit(
    url: str,
    token: str,
    follow: bool,
    parser: argparse.ArgumentParser,
    argv: list[str],
    train: TrainConfig,
) -> int:
    """Send a sweep that passed its checks here to the service; print its id and page.
    `parser` is the sweep command's, which read `argv`."""
    body = submission(parser, argv, train)
    made = json.loads(service_request(url, token, "POST", "/sweeps", body))
    print(f"[service] sweep {made['name']} queued as {made['id']} at {redact(url)}", flush=True)
    print(f"[service] page: {redact(url)}{made['page']}", flush=True)
    return follow_sweep(url, token, made["id"]) if follow else 0


def submission(
    parser: argparse.ArgumentParser, argv: list[str], train: TrainConfig
) -> dict[str, Any]:
    """The body of POST /sweeps: the experiment's text, the flags as given (the service's
    own flags and the experiment's path left out) and the files the flags name."""
    experiment, flags, files = None, [], {}
    for dest, tokens in argv_groups(parser, argv):
        if dest is None and experiment is None:
            experiment = tokens[0]
        elif dest not in (*SERVICE_KEYS, *FILE_KEYS, "--"):
            flags += tokens
    for key in FILE_KEYS:
        path = getattr(train, key)  # absolute: validate resolved it
        if path is not None:
            name = f"{key}/{Path(path).name}"
            files[name] = _read_text(path, f"--{key.replace('_', '-')} {path}")
            flags += [f"--{key.replace('_', '-')}", name]
    text = _read_text(experiment, f"experiment file {experiment}") if experiment else None
    size = sum(len(t.encode()) for t in [*files.values(), text or ""])
    if size > MAX_FILES_BYTES:
        raise UserError(
            f"the sweep's files hold {size / 2**20:.1f} MiB, over the service's "
            f"{MAX_FILES_BYTES >> 20} MiB; put the data on storage the cluster sees and name "
            "it with --dataset-dir"
        )
    return {"experiment_toml": text, "flags": flags, "files": files}


def argv_groups(
    parser: argparse.ArgumentParser, argv: list[str]
) -> list[tuple[str | None, list[str]]]:
    """argv split as argparse reads it: (dest, its tokens) per flag, (None, [word]) per
    positional word, ("--", ["--"]) for a bare `--`. For argv that parser accepted."""
    by_name = parser._option_string_actions
    groups: list[tuple[str | None, list[str]]] = []
    i, options_end = 0, False
    while i < len(argv):
        token = argv[i]
        i += 1
        if options_end or not token.startswith("-") or token == "-" or _is_number(parser, token):
            groups.append((None, [token]))
            continue
        if token == "--":
            options_end = True
            groups.append(("--", [token]))
            continue
        name, has_value = token.split("=", 1)[0], "=" in token
        action = by_name.get(name)
        if action is None and name.startswith("--"):  # argparse takes a unique prefix
            matches = {a for n, a in by_name.items() if n.startswith(name)}
            action = matches.pop() if len(matches) == 1 else None
        tokens = [token]
        takes = None if action is None else action.nargs
        follows = i < len(argv) and (not argv[i].startswith("-") or _is_number(parser, argv[i]))
        wants = takes is None or (takes == "?" and follows)
        if not has_value and wants and i < len(argv):
            tokens.append(argv[i])
            i += 1
        groups.append((action.dest if action else name, tokens))
    return groups


def _is_number(parser: argparse.ArgumentParser, token: str) -> bool:
    return bool(parser._negative_number_matcher.match(token))


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot send {what} to the service: {first_line(err)}") from None


def follow_sweep(url: str, token: str, sweep_id: int) -> int:
    """Print the sweep's driver log as it grows (and why it waits, while it waits) until
    it ends: 0 if it succeeded, else 1."""
    printed, said = 0, ""  # a queued sweep's reason, as last printed ("": none yet)
    while True:
        sweep = json.loads(service_request(url, token, "GET", f"/sweeps/{sweep_id}"))
        state = sweep["status"]
        reason = sweep.get("queued_reason") or "waiting"
        if state == "queued" and reason != said:
            said = reason
            print(f"[service] sweep {sweep['name']} is queued: {reason}", flush=True)
        log = service_request(
            url, token, "GET", f"/sweeps/{sweep_id}/logs?offset={printed}"
        ).decode()
        sys.stdout.write(log)
        sys.stdout.flush()
        printed += len(log)
        if state in ENDED:
            print(f"[service] sweep {sweep['name']} {state}", flush=True)
            return 0 if state == "succeeded" else 1
        time.sleep(FOLLOW_S)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the Authorization header to wherever a redirect points.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxy either: the token goes to the URL given and nowhere else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def service_request(url: str, token: str, method: str, path: str, body: Any = None) -> bytes:
    """One request to the service (raygpt.service.client's too); a refusal is a UserError
    with the service's one line, an unreachable service one that names the URL."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        said = _said(err)
        if err.code >= 500:
            raise UserError(f"the service at {redact(url)} failed ({said}); see its log") from None
        raise UserError(said) from None
    except (urllib.error.URLError, OSError) as err:
        why = getattr(err, "reason", err)
        raise UserError(
            f"cannot reach the service at {redact(url)} ({redact(str(why))}); check that it "
            "runs (python -m raygpt.service status on the head) and that your ssh -L tunnel "
            "is open"
        ) from None


def _said(err: urllib.error.HTTPError) -> str:
    """The service's one line from a refusal's body ({"error": ...})."""
    try:
        return str(json.loads(err.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {err.code} {err.reason}"
