"""User accounts: Argon2 hashes, roles, disable; the ``triage-node users`` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import AuditEvent, Role, User
from node.users.accounts import AccountError, Accounts


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
    ]
    assert all(who.startswith("cli:") for _, _, who in events)
