"""Web sessions the server can end: one ``web_sessions`` row per login.

The signed cookie proves that the node issued it, not that its holder is still
entitled to it: a copy taken before logout would otherwise work until it expires.
So the cookie also carries a random session id, and every authenticated request
looks its row up (one primary-key read, joined to the user). Logout revokes the
row; disabling a user or giving them a new password revokes all of theirs
(:class:`node.users.accounts.Accounts`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import User, WebSession
from node.users.accounts import Account

#: ``last_seen_at`` is written when it is older than this, not on every request.
SEEN_RESOLUTION = timedelta(minutes=1)


def _key(session_id: str) -> str:
    """What the table holds: a leaked copy of it must not let anyone in."""
    return hashlib.sha256(session_id.encode()).hexdigest()


class WebSessions:
    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None
    ) -> None:
        self._sessions = sessions
        #: Where the per-request lookup runs; see ``Node.reads``.
        self._reads = reads or sessions

    def start(self, user_id: int, now: datetime, *, max_age: timedelta) -> str:
        """A new session for ``user_id``; returns the id for the cookie.

        Rows past ``max_age`` are deleted here: no cookie can use them any more.
        """
        session_id = secrets.token_urlsafe(32)
        with self._sessions.begin() as session:
            session.execute(delete(WebSession).where(WebSession.created_at < now - max_age))
            session.add(
                WebSession(
                    id=_key(session_id),
                    user_id=user_id,
                    created_at=now,
                    last_seen_at=now,
                    revoked_at=None,
                )
            )
        return session_id

    def account(
        self, session_id: str, user_id: int, now: datetime, *, max_age: timedelta, seen: bool
    ) -> Account | None:
        """The active account this live session belongs to, or None.

        None if the session is unknown, revoked, older than ``max_age``, not
        ``user_id``'s, or its user is disabled. ``seen``: the user made this request
        (not a background poll); ``last_seen_at`` moves, at most once a minute.
        """
        key = _key(session_id)
        with self._reads() as session:
            row = session.execute(
                select(WebSession, User)
                .join(User, User.id == WebSession.user_id)
                .where(WebSession.id == key)
            ).first()
            if row is None:
                return None
            web_session, user = row
            account = Account.of(user)
            live = web_session.revoked_at is None and now - web_session.created_at <= max_age
            stale = now - web_session.last_seen_at >= SEEN_RESOLUTION
        if not live or account.id != user_id or not account.active:
            return None
        if seen and stale:
            with self._sessions.begin() as session:
                session.execute(
                    update(WebSession)
                    .where(WebSession.id == key, WebSession.last_seen_at < now)
                    .values(last_seen_at=now)
                )
        return account

    def revoke(self, session_id: str, now: datetime) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(WebSession)
                .where(WebSession.id == _key(session_id), WebSession.revoked_at.is_(None))
                .values(revoked_at=now)
            )
