"""The service's HTTP client for the commands: `python -m raygpt.service list`, `show`,
`cancel`, `logs`, `query` and `lr-law`.

The service's address comes from `--service URL` or $RAYGPT_SERVICE, the token from
`--token` or $RAYGPT_TOKEN (the variable keeps it out of the shell's history and the
process list). Requests go through raygpt.sweep.cli.service_request, the one function
that talks to the service, which `python -m raygpt.sweep --service` uses too: a refusal
(401, 403, 400, 404, 409) is a UserError with the service's one line, an unreachable
service one line that names the URL (masked) and what to do. The token is sent in the
Authorization header only: never printed, never in a URL, never to a redirect's target
or a proxy.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from raygpt.errors import UserError
from raygpt.sweep.remote import SERVICE_ENV, service_request, service_token, service_url


class Client:
    """The service at `url`, signed in with `token`."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self._token = token

    def __repr__(self) -> str:  # no token in a traceback's or a log's repr
        return f"Client({self.url!r})"

    @classmethod
    def from_flags(cls, service: str | None, token: str | None) -> Client:
        """A client from --service and --token, each falling back to its variable."""
        url = service_url(service)
        if url is None:
            raise UserError(
                f"no service: give --service URL or set ${SERVICE_ENV} (e.g. "
                "http://127.0.0.1:8000, forwarded from the head with ssh -L; docs/service.md)"
            )
        return cls(url, service_token(token))

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        return json.loads(self._send("GET", path, query))

    def post(self, path: str, body: Any = None) -> Any:
        return json.loads(self._send("POST", path, None, body if body is not None else {}))

    def text(self, path: str, query: list[tuple[str, str]] | None = None) -> str:
        return self._send("GET", path, query).decode("utf-8", errors="replace")

    # The routes the commands use.

    def sweeps(self, owner: str | None = None, status: str | None = None) -> list[dict]:
        query = [(k, v) for k, v in (("owner", owner), ("status", status)) if v]
        return self.get("/sweeps", query)["sweeps"]

    def sweep(self, sweep_id: int) -> dict:
        return self.get(f"/sweeps/{int(sweep_id)}")

    def cancel(self, sweep_id: int) -> dict:
        return self.post(f"/sweeps/{int(sweep_id)}/cancel")

    def logs(self, sweep_id: int, offset: int = 0) -> str:
        return self.text(f"/sweeps/{int(sweep_id)}/logs", [("offset", str(offset))])

    def trials(self, filters: list[tuple[str, str]]) -> dict:
        return self.get("/trials", filters)

    def lr_law(self, query: list[tuple[str, str]]) -> dict:
        return self.get("/lr-law", query)

    def _send(self, method: str, path: str, query: Any, body: Any = None) -> bytes:
        target = quote(path) + (f"?{urlencode(query)}" if query else "")
        return service_request(self.url, self._token, method, target, body)
