"""User accounts: Argon2 hashes, roles, disable; the ``triage-node users`` commands."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import select, update
from typer.testing import CliRunner

from node.cli import app
from node.db import migrate
from node.db.engine import READ_ONLY, make_engine, make_sessionmaker
from node.db.models import AuditEvent, Role, User
from node.users.accounts import Account, AccountError, Accounts
from node.users.throttle import Lock, LoginThrottle


@pytest.fixture
def accounts(database_url: str) -> Accounts:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    return Accounts(make_sessionmaker(engine))


def test_add_authenticate_disable(accounts: Accounts) -> None:
    added = accounts.add("alice", "correct horse", Role.ADMIN)
    assert added.is_admin and added.active
    assert accounts.authenticate("alice", "correct horse") == added
    assert accounts.authenticate("alice", "wrong password") is None
    assert accounts.authenticate("nobody", "correct horse") is None
    assert accounts.set_active("alice", False)
    assert accounts.authenticate("alice", "correct horse") is None
    assert not accounts.set_active("nobody", False)


def test_password_is_stored_as_argon2_hash(accounts: Accounts) -> None:
    accounts.add("bob", "s3cret-pass", Role.RADIOLOGIST)
    with accounts._sessions() as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "bob"))
    assert stored is not None and stored.startswith("$argon2id$")
    assert "s3cret-pass" not in stored


def test_refuses_duplicates_bad_names_and_short_passwords(accounts: Accounts) -> None:
    accounts.add("carol", "long enough", Role.RADIOLOGIST)
    with pytest.raises(AccountError, match="exists"):
        accounts.add("carol", "long enough", Role.ADMIN)
    with pytest.raises(AccountError, match="user name"):
        accounts.add("bad name", "long enough", Role.ADMIN)
    with pytest.raises(AccountError, match="8 characters"):
        accounts.add("dave", "short", Role.ADMIN)


def test_users_cli(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    runner = CliRunner()
    added = runner.invoke(
        app,
        ["users", "add", "root", "--role", "admin", "--password-stdin", "-c", str(config)],
        input="a-long-password\n",
    )
    assert added.exit_code == 0, added.output
    prompted = runner.invoke(
        app, ["users", "add", "rad", "-c", str(config)], input="another-pass\nanother-pass\n"
    )
    assert prompted.exit_code == 0, prompted.output
    listed = runner.invoke(app, ["users", "list", "-c", str(config)])
    assert "root" in listed.output and "admin" in listed.output and "radiologist" in listed.output
    assert runner.invoke(app, ["users", "disable", "rad", "-c", str(config)]).exit_code == 0
    assert runner.invoke(app, ["users", "disable", "ghost", "-c", str(config)]).exit_code == 1
    duplicate = runner.invoke(
        app,
        ["users", "add", "root", "--password-stdin", "-c", str(config)],
        input="a-long-password\n",
    )
    assert duplicate.exit_code == 1
    assert runner.invoke(app, ["users", "enable", "rad", "-c", str(config)]).exit_code == 0
    for name, code in (("rad", 0), ("ghost", 1)):
        changed = runner.invoke(
            app,
            ["users", "password", name, "--password-stdin", "-c", str(config)],
            input="a-new-password\n",
        )
        assert changed.exit_code == code, changed.output

    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
    with make_sessionmaker(engine)() as session:
        events = session.execute(
            select(AuditEvent.action, AuditEvent.detail, AuditEvent.user_name).order_by(
                AuditEvent.id
            )
        ).all()
    engine.dispose()
    assert [(a, d) for a, d, _ in events] == [
        ("user.add", "root as admin"),
        ("user.add", "rad as radiologist"),
        ("user.disable", "rad"),
        ("user.enable", "rad"),
        ("user.password", "rad"),
    ]
    assert all(who.startswith("cli:") for _, _, who in events)


def test_authenticate_checks_the_password_without_the_sqlite_write_lock(tmp_path: Path) -> None:
    """The Argon2 check takes a few hundred ms: inside a write transaction (BEGIN IMMEDIATE
    on SQLite) every failed login would hold up the ingest writers."""
    engine = make_engine(f"sqlite:///{tmp_path / 'users.db'}")
    migrate.upgrade(engine)
    reads = make_sessionmaker(engine.execution_options(**{READ_ONLY: True}))
    accounts = Accounts(make_sessionmaker(engine), reads)
    alice = accounts.add("alice", "correct horse", Role.ADMIN)
    results: list[Account | None] = []

    def log_in() -> None:
        results.append(accounts.authenticate("alice", "wrong password"))
        results.append(accounts.authenticate("alice", "correct horse"))

    with engine.connect() as writer:
        writer.begin()  # an ingest writer holding the write lock
        writer.execute(update(User).values(active=True))
        thread = threading.Thread(target=log_in)
        thread.start()
        thread.join(timeout=5)
        beside_the_writer = not thread.is_alive()
        writer.rollback()
    thread.join()
    assert beside_the_writer and results == [None, alice]


def test_an_outdated_hash_is_replaced_on_login(accounts: Accounts) -> None:
    accounts.add("carol", "correct horse", Role.RADIOLOGIST)
    weak = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=8192),)).hash("correct horse")
    with accounts._sessions.begin() as session:
        session.execute(update(User).where(User.name == "carol").values(password_hash=weak))
    assert accounts.authenticate("carol", "correct horse") is not None
    with accounts._sessions() as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "carol"))
    assert stored is not None and stored != weak
    assert accounts.authenticate("carol", "correct horse") is not None


def test_login_throttle_locks_names_and_addresses_for_a_growing_delay() -> None:
    now = [1000.0]
    throttle = LoginThrottle(
        max_failures=3, max_failures_per_address=5, window=900, lockout=60, clock=lambda: now[0]
    )
    assert throttle.failed("alice", "10.0.0.1") == []
    assert throttle.failed("alice", "10.0.0.1") == []
    assert throttle.failed("alice", "10.0.0.1") == [Lock("name", 60)]
    assert throttle.retry_after("alice", "10.0.0.2") == 60
    assert throttle.retry_after("bob", "10.0.0.1") is None  # the address has 3 of 5
    now[0] += 61
    assert throttle.retry_after("alice", None) is None
    assert throttle.failed("alice", None) == [Lock("name", 120)]  # doubled
    assert throttle.failed("bob", "10.0.0.1") == []
    assert throttle.failed("carol", "10.0.0.1") == [Lock("address", 60)]
    assert throttle.retry_after("dave", "10.0.0.1") == 60
    throttle.succeeded("alice")  # clears the name, not the address
    assert throttle.retry_after("alice", None) is None
    assert throttle.retry_after("alice", "10.0.0.1") == 60
    now[0] += 900  # the window passed: the failures are forgotten
    assert throttle.failed("carol", "10.0.0.1") == []
