"""Who is asking: the session cookie, roles, and CSRF tokens.

The session (a cookie signed by Starlette's SessionMiddleware) holds the user's id,
the id of its ``web_sessions`` row, a CSRF token, and when it started and was last
used. It ends ``web.session_minutes`` after the last request the user made (the
worklist's background polls do not count, so an unattended open worklist still logs
out) and ``web.session_max_hours`` after login however active. The row and the
account are read on every request (one primary-key lookup), so logging out ends the
session for every copy of the cookie, and disabling a user or setting a new password
ends all of theirs at once. Unsafe requests (POST, PUT, PATCH, DELETE) must echo the
session's CSRF token in the ``X-CSRF-Token`` header or a ``csrf_token`` form field.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.config import WebSettings
from node.users.accounts import Account
from node.users.throttle import Lock, LoginThrottle
from node.web.context import WebContext, client_address, web_context

SESSION_USER = "uid"
SESSION_ID = "sid"
SESSION_CSRF = "csrf"
SESSION_STARTED = "started"
SESSION_SEEN = "seen"
#: Requests an open worklist makes by itself: they do not keep its session alive.
BACKGROUND_PATHS = frozenset({"/api/worklist/fingerprint", "/worklist/rows"})
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Where passwords are checked: the API's and the login form's POST.
LOGIN_PATHS = frozenset({"/api/session", "/login"})
#: The form encodings the login form's handler accepts (Starlette parses both).
_FORMS = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


class NotAuthenticated(Exception):
    """No valid session: 401 for the API, a redirect to the login page for pages."""


class Forbidden(Exception):
    """Logged in, but the role does not allow it: 403."""


class CsrfFailed(Exception):
    """An unsafe request without the session's CSRF token: 403."""


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use (the login page creates it)."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


async def check_csrf(request: Request) -> None:
    if request.method not in _UNSAFE:
        return
    expected = request.session.get(SESSION_CSRF)
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    # As bytes: compare_digest raises on a non-ASCII str (a 500 instead of a 403).
    if not isinstance(expected, str) or given is None:
        raise CsrfFailed
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfFailed


def log_in(request: Request, account: Account, ctx: WebContext) -> None:
    """Start a fresh session for ``account`` (new id and CSRF token: no session fixation).

    A session this browser held before ends on the server too.
    """
    now = int(time.time())
    log_out(request, ctx)
    request.session[SESSION_ID] = ctx.web_sessions.start(
        account.id, _at(now), max_age=_max_age(ctx.settings.web)
    )
    request.session[SESSION_USER] = account.id
    request.session[SESSION_CSRF] = secrets.token_urlsafe(32)
    request.session[SESSION_STARTED] = request.session[SESSION_SEEN] = now


def log_out(request: Request, ctx: WebContext) -> None:
    """End the session for every copy of its cookie, not only this browser's."""
    session_id = request.session.get(SESSION_ID)
    if isinstance(session_id, str):
        ctx.web_sessions.revoke(session_id, _at(int(time.time())))
    request.session.clear()


def current_user(request: Request, ctx: Annotated[WebContext, Depends(web_context)]) -> Account:
    user_id, session_id = request.session.get(SESSION_USER), request.session.get(SESSION_ID)
    if (
        not isinstance(user_id, int)
        or not isinstance(session_id, str)
        or _expired(request.session, ctx.settings.web)
    ):
        request.session.clear()
        raise NotAuthenticated
    now = int(time.time())
    background = request.url.path in BACKGROUND_PATHS
    account = ctx.web_sessions.account(
        session_id, user_id, _at(now), max_age=_max_age(ctx.settings.web), seen=not background
    )
    if account is None:  # logged out, revoked, or the user disabled
        request.session.clear()
        raise NotAuthenticated
    if not background and request.session[SESSION_SEEN] != now:
        request.session[SESSION_SEEN] = now  # changed: Starlette re-signs the cookie
    request.state.user = account
    return account


def _at(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _max_age(settings: WebSettings) -> timedelta:
    return timedelta(hours=settings.session_max_hours)


def _expired(session: dict[str, Any], settings: WebSettings) -> bool:
    """Idle too long, past the maximum age, or a session from before these were kept."""
    started, seen = session.get(SESSION_STARTED), session.get(SESSION_SEEN)
    if not isinstance(started, int) or not isinstance(seen, int):
        return True
    now = time.time()
    return (
        now - seen > settings.session_minutes * 60
        or now - started > settings.session_max_hours * 3600
    )


async def _csrf_checked(request: Request) -> None:
    await check_csrf(request)


def radiologist(
    account: Annotated[Account, Depends(current_user)],
    _csrf: Annotated[None, Depends(_csrf_checked)],
) -> Account:
    """Any logged-in user (radiologists and admins read studies)."""
    return account


def admin(account: Annotated[Account, Depends(radiologist)]) -> Account:
    if not account.is_admin:
        raise Forbidden
    return account


User = Annotated[Account, Depends(radiologist)]
Admin = Annotated[Account, Depends(admin)]


#: The answer to a refused login: (request, its form or JSON fields, seconds to wait).
Refusal = Callable[[Request, dict[str, str], int], Response]
#: Audits a lock that a failed login started: (request, name tried, the lock).
LockAudit = Callable[[Request, str, Lock], None]


class LoginThrottleMiddleware:
    """Throttles both login endpoints alike, around their handlers (inside the session).

    A login to a locked name or from a locked address is answered by ``refuse``
    without checking the password; a 401 from a handler counts as a failure, a
    success clears the name's failures.
    """

    def __init__(
        self, app: ASGIApp, *, throttle: LoginThrottle, refuse: Refusal, audit: LockAudit
    ) -> None:
        self._app = app
        self._throttle = throttle
        self._refuse = refuse
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self._app(scope, receive, send)
            return
        body = await _read_body(receive)
        replay = _replay(body, receive)
        request = Request(scope, replay)
        fields = await _fields(scope, body)
        name, address = fields.get("name"), client_address(request)
        wait = self._throttle.retry_after(name, address)
        if wait is not None:
            await self._refuse(request, fields, wait)(scope, replay, send)
            return
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self._app(scope, replay, send_status)
        if status == [401]:
            for lock in self._throttle.failed(name, address):
                await run_in_threadpool(self._audit, request, name or "", lock)
        elif status and status[0] < 400 and name:
            self._throttle.succeeded(name)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


async def _nothing_more() -> Message:
    """After the whole body: what a server sends when the client goes away."""
    return {"type": "http.disconnect"}


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _fields(scope: Scope, body: bytes) -> dict[str, str]:
    """The string fields of a form (either encoding) or JSON body ({} if it is neither).

    Forms are parsed by Starlette, as the login handler will parse them: a name the
    handler checks a password for is a name the throttle counts (multipart/form-data
    included, which a page or a script may post as well as a browser's default).
    """
    media = Headers(scope=scope).get("content-type", "").partition(";")[0].strip().lower()
    if media in _FORMS:
        request = Request(scope, _replay(body, _nothing_more))
        try:
            form = await request.form()
        except (HTTPException, MultiPartException):  # malformed: the handler refuses it
            return {}
        try:
            return {k: v for k, v in form.items() if isinstance(v, str)}
        finally:
            await form.close()
    try:  # bytes, as Starlette reads them for the API: UTF-8, -16 or -32, a BOM or not
        data = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)}


def local_path(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None.

    Not ``//host`` and not ``/\\host``: browsers read both as another host, which
    would make the login page an open redirect.
    """
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return None
