"""The service's users, their quotas, and the API tokens they sign in with.

A token is `secrets.token_urlsafe(32)` (256 random bits, never starting with "-", which
`--token TOKEN` would read as a flag), handed out once, by
`add_user` or `issue_token`, to the caller, who hands it to the person. The database
keeps only its sha256 hex: a copy of the database, a backup or a query log holds
nothing that signs in, and a random 256-bit token needs no salt or slow hash (there is
no dictionary to try). Nothing here prints, logs or raises a token.

`verify` looks a token up by its hash and compares the two digests in constant time;
a revoked token is refused (`revoke` revokes every token of a user). User names follow the
rule of run and sweep names (run_folder.check_name): one plain folder name, so a
user's name may also name a folder of theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from raygpt.errors import UserError
from raygpt.run_folder import check_name
from raygpt.service.db import tokens, users

DEFAULT_GPU_QUOTA = 1.0  # GPUs a user's sweeps may hold at once
DEFAULT_CPU_QUOTA = 8.0  # CPUs a user's sweeps may hold at once
DEFAULT_PRIORITY = 0  # higher goes first in the queue


@dataclass(frozen=True)
class User:
    """A user as the service sees one: a name, quotas and a priority (no token)."""

    name: str
    gpu_quota: float
    cpu_quota: float
    priority: int
    created_at: float


def token_hash(token: str) -> str:
    """What the database keeps of a token: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(
    db: sa.Engine,
    name: str,
    gpu_quota: float = DEFAULT_GPU_QUOTA,
    cpu_quota: float = DEFAULT_CPU_QUOTA,
    priority: int = DEFAULT_PRIORITY,
) -> str:
    """Add a user with their first token, and return that token: the only time it is
    seen. A one-line UserError for a bad name or quota, or a name already taken."""
    check_name(name, "user name")
    values = {
        "name": name,
        "gpu_quota": _quota("gpu_quota", gpu_quota),
        "cpu_quota": _quota("cpu_quota", cpu_quota),
        "priority": _priority(priority),
        "created_at": time.time(),
    }
    with db.begin() as conn:
        if conn.execute(sa.select(users.c.name).where(users.c.name == name)).first():
            raise UserError(
                f"user {name!r} exists already; choose another name, or issue them a new token"
            )
        conn.execute(sa.insert(users).values(values))
        return _new_token(conn, name)


def issue_token(db: sa.Engine, name: str) -> str:
    """Another token for an existing user (their others stay valid); returned once."""
    with db.begin() as conn:
        _require(conn, name)
        return _new_token(conn, name)


def _new_token(conn: sa.Connection, name: str) -> str:
    token = random_token()
    conn.execute(
        sa.insert(tokens).values(
            user_name=name, token_sha256=token_hash(token), created_at=time.time()
        )
    )
    return token


def random_token() -> str:
    """256 random bits, URL-safe. One draw in 64 starts with "-", which a command line
    (`--token TOKEN`) takes for a flag; such a draw is drawn again."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def verify(db: sa.Engine, token: Any) -> User | None:
    """The user a token belongs to, or None: unknown, revoked, or not a token at all."""
    if not isinstance(token, str) or not token:
        return None
    digest = token_hash(token)
    query = (
        sa.select(tokens.c.token_sha256, users)
        .join(users, users.c.name == tokens.c.user_name)
        .where(tokens.c.token_sha256 == digest, tokens.c.revoked_at.is_(None))
    )
    with db.connect() as conn:
        row = conn.execute(query).mappings().first()
    # The lookup goes by the hash, which a caller cannot steer byte by byte; the final
    # comparison is constant-time all the same.
    if row is None or not hmac.compare_digest(row["token_sha256"], digest):
        return None
    return User(
        name=row["name"],
        gpu_quota=row["gpu_quota"],
        cpu_quota=row["cpu_quota"],
        priority=row["priority"],
        created_at=row["created_at"],
    )


def revoke(db: sa.Engine, name: str) -> int:
    """Revoke every live token of user `name`; return how many. The user stays, with
    their sweeps; issue_token gives them a new one."""
    with db.begin() as conn:
        _require(conn, name)
        done = conn.execute(
            sa.update(tokens)
            .where(tokens.c.user_name == name, tokens.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
        return done.rowcount


def get_user(db: sa.Engine, name: str) -> User | None:
    """User `name`, or None."""
    with db.connect() as conn:
        row = conn.execute(sa.select(users).where(users.c.name == name)).mappings().first()
    return User(**row) if row else None


def _require(conn: sa.Connection, name: str) -> None:
    if not conn.execute(sa.select(users.c.name).where(users.c.name == name)).first():
        known = conn.execute(sa.select(users.c.name).order_by(users.c.name)).scalars().all()
        listed = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise UserError(f"no user {name!r}; users: {listed or 'none yet'}")


def _quota(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} must be a finite number >= 0")
    if value < 0:
        raise UserError(f"{key}={value!r} must be >= 0")
    return float(value)


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"priority={value!r} must be an integer")
    return value
