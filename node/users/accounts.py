"""User accounts in the ``users`` table: create, list, disable, set passwords, authenticate."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Role, User, WebSession
from node.db.types import utcnow
from node.errors import NodeError
from node.users import passwords

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AccountError(NodeError):
    """A user account cannot be created or changed (name taken, bad name, weak password)."""


@dataclass(frozen=True, slots=True)
class Account:
    """A user as the web application sees it (never the password hash)."""

    id: int
    name: str
    role: Role
    active: bool
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @classmethod
    def of(cls, user: User) -> Account:
        return cls(user.id, user.name, Role(user.role), user.active, user.created_at)


class Accounts:
    """Create, list, disable and authenticate users."""

    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None
    ) -> None:
        self._sessions = sessions
        #: Where lookups run (every authenticated request does one); see ``Node.reads``.
        self._reads = reads or sessions

    def add(self, name: str, password: str, role: Role) -> Account:
        if not _NAME.match(name):
            raise AccountError("a user name is 1-64 letters, digits or . _ @ -")
        try:
            password_hash = passwords.hash_password(password)
        except passwords.WeakPassword as exc:
            raise AccountError(str(exc)) from None
        user = User(
            name=name, password_hash=password_hash, role=role, active=True, created_at=utcnow()
        )
        try:
            with self._sessions.begin() as session:
                session.add(user)
                session.flush()
                account = Account.of(user)
        except IntegrityError:
            raise AccountError(f"user {name!r} exists already") from None
        log.info("user added name=%s role=%s", name, role)
        return account

    def list(self) -> list[Account]:
        with self._sessions() as session:
            return [Account.of(u) for u in session.scalars(select(User).order_by(User.name))]

    def get(self, user_id: int) -> Account | None:
        with self._reads() as session:
            user = session.get(User, user_id)
            return Account.of(user) if user is not None else None

    def set_active(self, name: str, active: bool) -> bool:
        """Enable or disable a user; disabling ends all of their web sessions for good."""
        with self._sessions.begin() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                return False
            user.active = active
            if not active:
                _end_sessions(session, user.id)
        log.info("user %s name=%s", "enabled" if active else "disabled", name)
        return True

    def set_password(self, name: str, password: str) -> bool:
        """Give a user a new password; their web sessions end (whoever held them)."""
        try:
            password_hash = passwords.hash_password(password)
        except passwords.WeakPassword as exc:
            raise AccountError(str(exc)) from None
        with self._sessions.begin() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                return False
            user.password_hash = password_hash
            _end_sessions(session, user.id)
        log.info("user password changed name=%s", name)
        return True

    def authenticate(self, name: str, password: str) -> Account | None:
        """The active account with this name and password, or None (same time either way).

        The lookup reads a snapshot and the Argon2 check (a few hundred ms) runs outside
        any transaction: on SQLite a write transaction would hold the database's only
        write lock, so anonymous failed logins would stall the ingest writers. Only an
        outdated hash is written back, if it is still the one stored.
        """
        with self._reads() as session:
            # No account name has a NUL, and PostgreSQL would refuse it with an error.
            user = None if "\x00" in name else session.scalar(select(User).where(User.name == name))
            account = Account.of(user) if user is not None else None
            stored = user.password_hash if user is not None else None
        ok, new_hash = passwords.verify(password, stored)
        if account is None or not ok or not account.active:
            return None
        if new_hash is not None:
            with self._sessions.begin() as session:
                session.execute(
                    update(User)
                    .where(User.id == account.id, User.password_hash == stored)
                    .values(password_hash=new_hash)
                )
        return account


def _end_sessions(session: Session, user_id: int) -> None:
    """Revoke every live web session of the user (``node.users.web_sessions``)."""
    session.execute(
        update(WebSession)
        .where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
