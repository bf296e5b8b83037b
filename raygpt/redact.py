"""Secrets out of everything raygpt shows or keeps: one place that masks them.

A URI can carry credentials (`http://user:PASSWORD@host`, `...?token=...`), and raygpt
echoes URIs in error lines, keeps the config in run.json, sweep.json, the Parquet
footers and checkpoints, and hands it to W&B and MLflow as parameters. `redact` masks
the secrets in any text; `redact_config` in a config or record before it is written.
The code that connects keeps the real value: only copies meant for people and files
pass through here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Names whose value is a secret, compared lower-cased with '-' read as '_': exact names,
# then endings (aws_secret_access_key, MLFLOW_TRACKING_PASSWORD, my_api_key).
_NAMES = frozenset({
    "password", "passwd", "pwd", "secret", "token", "auth", "authorization", "credential",
    "credentials", "secret_key", "access_key", "session_token", "access_token",
    "refresh_token", "id_token", "auth_token", "api_token", "security_token", "api_key",
    "apikey", "private_key", "client_secret", "sas_token",
})  # fmt: skip
_ENDINGS = (
    "_password", "_passwd", "_secret", "_secret_key", "_access_key", "_api_key", "_apikey",
    "_session_token", "_access_token", "_refresh_token", "_auth_token", "_api_token",
    "_security_token", "_private_key", "_credentials", "_client_secret",
)  # fmt: skip
# In a URI query or `name=value` text, also the short names of signed URLs and API keys
# (S3 / GCS presigned URLs, Azure SAS, Google's ?key=). Not as config keys: a record's
# "key" or "signature" field is no secret.
_QUERY_NAMES = frozenset({
    "key", "sig", "signature", "x_amz_signature", "x_amz_credential", "x_goog_signature",
    "x_goog_credential",
})  # fmt: skip

# scheme://USERINFO@: the userinfo runs to the last '@' before the host ends, so a
# password with a raw '@' in it is masked whole.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#\"'<>\\]+)@")
# name=value, in a query string, a flag (--secret-key=...) or prose; the value ends at a
# separator, a quote, or a ':' that ends it ("--storage-path URI: what is wrong").
_ASSIGN = re.compile(
    r"(?<![\w.%])([A-Za-z_-][\w.%-]*)=([^\s&#;\"'<>,)\]}]+?)(?=:?(?:[\s&#;\"'<>,)\]}]|$))"
)
# 'name': 'value' and "name": "value", as a dict's repr or JSON prints them.
_QUOTED = re.compile(r"""(["'])([A-Za-z_][\w.-]*)\1(\s*:\s*)(["'])((?:(?!\4).)+)\4""")
# An HTTP header as a client's error may quote it: "Authorization: Bearer TOKEN".
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization:\s*)(?:(bearer|basic|token)\s+)?[^\s\"',;]+")


def is_secret_name(name: str, query: bool = False) -> bool:
    """Whether a value called `name` is a secret; `query`: a URI query's or text's name."""
    norm = unquote(name).strip().lower().replace("-", "_").lstrip("_")
    return norm in _NAMES or norm.endswith(_ENDINGS) or (query and norm in _QUERY_NAMES)


def redact(text: str) -> str:
    """`text` with every password in a URI's userinfo and every secret-named value masked.

    `http://user:pw@host` -> `http://user:***@host`; `https://TOKEN@host` -> `https://***@host`;
    `...?endpoint_override=e&secret_key=s` -> `...?endpoint_override=e&secret_key=***`.
    """
    if not isinstance(text, str) or not text:
        return text

    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m[2].partition(":")
        return f"{m[1]}{user}:{MASK}@" if colon else f"{m[1]}{MASK}@"

    def assign(m: re.Match[str]) -> str:
        return f"{m[1]}={MASK}" if is_secret_name(m[1], query=True) else m[0]

    def quoted(m: re.Match[str]) -> str:
        if not is_secret_name(m[2], query=True):
            return m[0]
        return f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{MASK}{m[4]}"

    text = _USERINFO.sub(userinfo, text)
    text = _ASSIGN.sub(assign, text)
    text = _QUOTED.sub(quoted, text)
    return _HEADER.sub(lambda m: f"{m[1]}{m[2] + ' ' if m[2] else ''}{MASK}", text)


def redact_config(value: Any) -> Any:
    """A copy of `value` (a config, a record: dicts, lists, strings) with secrets masked:
    every string through `redact`, and the whole value of a secret-named key."""
    if isinstance(value, dict):
        return {
            k: MASK
            if isinstance(k, str) and is_secret_name(k) and not _blank(v)
            else redact_config(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        masked = [redact_config(v) for v in value]
        return tuple(masked) if isinstance(value, tuple) else masked
    if isinstance(value, str):
        return redact(value)
    return value


def _blank(value: Any) -> bool:
    """None or "": nothing to hide (and no `==` on a value that may be an array)."""
    return value is None or (isinstance(value, str) and not value)
