"""FastAPI application factory: pages, the REST API (OpenAPI at /docs), sessions, errors.

Errors are translated here, at the boundary: no session -> 401 (API) or the login
page; wrong role or missing CSRF token -> 403; a node error -> a problem response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.config import WebSettings
from node.errors import NodeError
from node.observability.readiness import readiness_router
from node.users.throttle import Lock, LoginThrottle
from node.web import auth, pages
from node.web.api import audit, destinations, rules, session, status, studies, worklist
from node.web.context import STATIC_DIR, WebContext, client_address
from node.web.internal import FILES_PREFIX, internal_router
from node.web.secret import session_secret
from node.web.service import health_router

if TYPE_CHECKING:
    from node.runtime import Node

SESSION_COOKIE = "triage_session"


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error(request: Request, status: int, message: str) -> Response:
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=status)
    ctx: WebContext = request.app.state.ctx
    user = getattr(request.state, "user", None)
    return pages.render(ctx, request, "error.html", user, status, status=status, message=message)


def _after_login(request: Request) -> str:
    """Where to go after logging in: the page asked for, or for a form posted after the
    session ended, the page it was posted from (the browser GETs ``next``, and a POST
    route answers a GET with 405; the form's action is lost either way)."""
    url = urlsplit(str(request.url))
    if request.method not in ("GET", "HEAD"):
        referer = urlsplit(request.headers.get("referer", ""))
        url = referer if referer.netloc == url.netloc else url._replace(path="/", query="")
    return auth.local_path(url.path + (f"?{url.query}" if url.query else "")) or "/"


def _login_refused(request: Request, fields: dict[str, str], seconds: int) -> Response:
    wait = f"{-(-seconds // 60)} minutes" if seconds > 90 else f"{seconds} seconds"
    message = f"Too many failed logins: try again in {wait}."
    headers = {"Retry-After": str(seconds)}
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=429, headers=headers)
    ctx: WebContext = request.app.state.ctx
    target = auth.local_path(fields.get("next")) or "/"
    page = pages.render(ctx, request, "login.html", None, 429, next=target, error=message)
    page.headers.update(headers)
    return page


def _login_locked(request: Request, name: str, lock: Lock) -> None:
    ctx: WebContext = request.app.state.ctx
    detail = f"{lock.key} locked for {lock.seconds} s"
    ctx.audit.record(name, "login.locked", detail=detail, client_address=client_address(request))


def _login_throttle(settings: WebSettings) -> LoginThrottle:
    return LoginThrottle(
        max_failures=settings.login_max_failures,
        max_failures_per_address=settings.login_max_failures_per_address,
        window=settings.login_window_minutes * 60,
        lockout=settings.login_lockout_seconds,
    )


class NoStore:
    """``Cache-Control: no-store`` on every response but static assets.

    Pages, API answers and images carry patient data: on a shared workstation a
    browser cache would show them after logout, without a login or an audit event.
    Set here, for all routes, so that no handler can forget it (it replaces what a
    handler set).
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/static/"):
            await self._app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        await self._app(scope, receive, send_no_store)


#: What a page of the node may load and run: its own files only. No inline script or
#: style (the pages have none: app.js wires each page up), no plugins, no <base>, no
#: forms to other sites, and no framing by any site (clickjacking of admin buttons).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN with an inline script:
#: they hold no patient data, and get only the directives that do not break them.
DOCS_POLICY = "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "X-Content-Type-Options": "nosniff",
    # Same-origin links keep their Referer (the login form's return path needs it); a
    # worklist URL with a patient ID searched for never goes to another site.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: HSTS for a year; not includeSubDomains: other hosts of a hospital's domain may be HTTP.
HSTS_SECONDS = 365 * 24 * 3600


class SecurityHeaders:
    """The headers above, and the right Content-Security-Policy, on every response.

    Set for all routes (pages, API, static files, error pages) so no handler can
    forget them; like :class:`NoStore`, they replace what a handler set. With ``https``
    (the node serves TLS or ``web.secure_cookies``: behind a TLS proxy) browsers are
    also told to use HTTPS only (HSTS), so a session cookie never meets plain HTTP.
    """

    def __init__(self, app: ASGIApp, *, https: bool = False) -> None:
        self._app = app
        self._headers = dict(SECURITY_HEADERS)
        if https:
            self._headers["Strict-Transport-Security"] = f"max-age={HSTS_SECONDS}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope["path"] in _DOCS_PATHS else PAGE_POLICY

        async def send_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.update(self._headers)
                headers["Content-Security-Policy"] = policy
            await send(message)

        await self._app(scope, receive, send_headers)


class RefuseNul:
    """400 for a NUL character in the path or the query string, before any handler.

    PostgreSQL text cannot hold one: the query would fail with a 500 and a traceback
    in the log, for anyone (the login page needs no account). No UID, user name,
    search or filter of the node contains one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope["path"]
            or b"%00" in scope["query_string"]
            or b"\x00" in scope["query_string"]
        ):
            response = JSONResponse({"detail": "NUL character in the URL"}, status_code=400)
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


#: The largest request body the user-facing app reads: forms, logins and rules
#: documents are far smaller. Result uploads (internal API) have their own limit.
MAX_BODY_BYTES = 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a request body over ``MAX_BODY_BYTES``, before any handler reads it.

    FastAPI reads a JSON or form body whole before the route's dependencies (the login
    check among them) run: unbounded, one anonymous POST could fill the memory. A
    declared Content-Length over the limit is refused unread; a chunked body is cut
    off where it passes the limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(FILES_PREFIX):
            await self._app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _too_large(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(scope, receive, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": "request body too large"}, status_code=413)
    await response(scope, receive, send)


def create_app(node: Node) -> FastAPI:
    app = FastAPI(
        title="triage-node",
        version="0.1.0",
        description="Worklist, studies, results, routing rules and audit trail of a triage node. "
        "Log in with POST /api/session; send the returned csrf_token as X-CSRF-Token on POSTs.",
    )
    app.state.ctx = WebContext.of(node)
    settings = node.settings.web
    app.add_middleware(  # inside the session middleware: the login page needs the session
        auth.LoginThrottleMiddleware,
        throttle=_login_throttle(settings),
        refuse=_login_refused,
        audit=_login_locked,
    )
    app.add_middleware(BodyLimit)  # outside the throttle, which reads login bodies itself
    app.add_middleware(RefuseNul)  # added first, runs inside: its 400 gets the headers
    app.add_middleware(NoStore)
    app.add_middleware(SecurityHeaders, https=settings.secure_cookies)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(node.settings),
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_minutes * 60,
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (session, worklist, studies, audit, rules, destinations, status):
        app.include_router(module.router)
    if node.serves_internal_api_on_web_port:
        # All-in-one without cluster.internal_port: remote workers find the API here.
        # The web role never serves it (it holds no instances); see cluster.internal_port.
        app.include_router(internal_router(node))
    app.include_router(readiness_router(node))  # /readyz by check: before health_router's
    app.include_router(health_router(node))  # /healthz, /metrics: no login
    app.include_router(pages.router)

    @app.exception_handler(auth.NotAuthenticated)
    def _unauthenticated(request: Request, exc: auth.NotAuthenticated) -> Response:
        if _is_api(request):
            return JSONResponse(
                {"detail": "not logged in"},
                status_code=401,
                headers={"WWW-Authenticate": 'Cookie realm="triage-node"'},
            )
        return RedirectResponse(f"/login?next={quote(_after_login(request))}", status_code=303)

    @app.exception_handler(auth.Forbidden)
    def _forbidden(request: Request, exc: auth.Forbidden) -> Response:
        return _error(request, 403, "This needs the admin role.")

    @app.exception_handler(auth.CsrfFailed)
    def _csrf(request: Request, exc: auth.CsrfFailed) -> Response:
        return _error(request, 403, "Missing or wrong CSRF token; reload the page and try again.")

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_api(request) or request.url.path in ("/docs", "/openapi.json"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(NodeError)
    def _node_error(request: Request, exc: NodeError) -> Response:
        return _error(request, 500, f"{type(exc).__name__}: {exc}")

    _ = HTTPException  # FastAPI's subclass is handled by the Starlette handler above
    return app
