"""Users and tokens (raygpt/service/auth.py) on SQLite and on a real PostgreSQL server: a
token is shown once and kept only as its sha256, a revoked one is refused, and no token
reaches the database, its statement log or an error line."""

from __future__ import annotations

import hashlib
import logging

import pytest
import sqlalchemy as sa

from raygpt.errors import UserError
from raygpt.service import auth
from raygpt.service import db as service_db


def _every_value(engine: sa.Engine) -> str:
    """Every value of every table, as text: what a copy of the database gives away."""
    with engine.connect() as conn:
        return repr(
            [conn.execute(sa.select(table)).all() for table in service_db.metadata.sorted_tables]
        )


def test_a_token_is_shown_once_and_kept_only_as_its_hash(db, caplog):
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # every statement, with its values
    token = auth.add_user(db, "ada", gpu_quota=2.5, cpu_quota=16, priority=3)
    second = auth.issue_token(db, "ada")
    assert token != second and len(token) >= 43
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    user = auth.verify(db, token)
    assert user == auth.User("ada", 2.5, 16.0, 3, user.created_at)
    assert auth.verify(db, second) == user
    assert token not in repr(user)
    stored = _every_value(db)
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert digest in stored and auth.token_hash(token) == digest
    assert token not in stored and second not in stored
    assert digest in caplog.text  # the log was on, and saw the hash only
    assert token not in caplog.text and second not in caplog.text


def test_no_token_starts_with_a_dash(db, monkeypatch):
    """`--token -x...` reads as a missing value and another flag, so a draw starting with
    "-" is drawn again."""
    draws = iter(["-x" + "a" * 41, "b" * 43])
    monkeypatch.setattr(auth.secrets, "token_urlsafe", lambda n: next(draws))
    assert auth.add_user(db, "ada") == "b" * 43
    monkeypatch.undo()
    assert not any(auth.random_token().startswith("-") for _ in range(2000))


def test_a_revoked_token_is_refused(db):
    ada = auth.add_user(db, "ada")
    bob = auth.add_user(db, "bob", gpu_quota=0, cpu_quota=2)
    assert auth.revoke(db, "ada") == 1
    assert auth.verify(db, ada) is None
    assert auth.verify(db, bob).name == "bob"  # another user's token stays good
    assert auth.revoke(db, "ada") == 0  # nothing left to revoke
    fresh = auth.issue_token(db, "ada")
    assert auth.verify(db, fresh).name == "ada" and auth.verify(db, ada) is None
    assert auth.get_user(db, "ada").gpu_quota == auth.DEFAULT_GPU_QUOTA
    with pytest.raises(UserError, match=r"^no user 'carol'; users: ada, bob$"):
        auth.revoke(db, "carol")


@pytest.mark.parametrize("token", [None, "", "x", 42, b"bytes", "a" * 43])
def test_anything_but_a_live_token_is_refused(db, token):
    auth.add_user(db, "ada")
    assert auth.verify(db, token) is None


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "a/b"}, "user name 'a/b' contains a path separator"),
        ({"name": ".ada"}, "user name '.ada' starts with '.'"),
        ({"name": ""}, "user name '' is empty"),
        ({"name": "a" * 201}, "is 201 characters long"),
        ({"name": "ada", "gpu_quota": -1}, "gpu_quota=-1 must be >= 0"),
        ({"name": "ada", "cpu_quota": float("nan")}, "cpu_quota=nan must be a finite number"),
        ({"name": "ada", "gpu_quota": True}, "gpu_quota=True must be a finite number"),
        ({"name": "ada", "priority": 1.5}, "priority=1.5 must be an integer"),
    ],
)
def test_a_bad_user_is_one_line_and_adds_nothing(db, kwargs, fragment):
    with pytest.raises(UserError) as err:
        auth.add_user(db, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(service_db.users)).scalar() == 0


def test_a_name_is_taken_once(db):
    token = auth.add_user(db, "ada")
    with pytest.raises(UserError, match=r"^user 'ada' exists already") as err:
        auth.add_user(db, "ada")
    assert token not in str(err.value)
    assert auth.verify(db, token).name == "ada"  # the first one's token still works
