"""Who is asking: the session cookie, roles, and CSRF tokens.

The session (a cookie signed by Starlette's SessionMiddleware, expiring
``web.session_minutes`` after the last request) holds only the user's id and a
CSRF token. The account is read on every request, so disabling a user ends their
sessions at once. Unsafe requests (POST, PUT, PATCH, DELETE) must echo the
session's CSRF token in the ``X-CSRF-Token`` header or a ``csrf_token`` form field.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Request

from node.users.accounts import Account
from node.web.context import WebContext, web_context

SESSION_USER = "uid"
SESSION_CSRF = "csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
    if not isinstance(expected, str) or given is None or not hmac.compare_digest(expected, given):
        raise CsrfFailed


def log_in(request: Request, account: Account) -> None:
    """Start a fresh session for ``account`` (new CSRF token: no session fixation)."""
    request.session.clear()
    request.session[SESSION_USER] = account.id
    request.session[SESSION_CSRF] = secrets.token_urlsafe(32)


def log_out(request: Request) -> None:
    request.session.clear()


def current_user(request: Request, ctx: Annotated[WebContext, Depends(web_context)]) -> Account:
    user_id = request.session.get(SESSION_USER)
    if not isinstance(user_id, int):
        raise NotAuthenticated
    account = ctx.accounts.get(user_id)
    if account is None or not account.active:
        request.session.clear()
        raise NotAuthenticated
    request.state.user = account
    return account


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
