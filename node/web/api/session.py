"""Log in and out through the API (scripts); pages use the login form."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from node.web import auth
from node.web.context import Context, client_address

router = APIRouter(prefix="/api/session", tags=["session"])


class Credentials(BaseModel):
    name: str
    password: str


class SessionOut(BaseModel):
    name: str
    role: str
    #: Send this in the X-CSRF-Token header of every POST.
    csrf_token: str


@router.post("", response_model=SessionOut)
def log_in(credentials: Credentials, request: Request, ctx: Context) -> SessionOut:
    """Start a session (the cookie comes back with the response)."""
    account = ctx.accounts.authenticate(credentials.name, credentials.password)
    if account is None:
        ctx.audit.record(credentials.name, "login.failed", client_address=client_address(request))
        raise HTTPException(status_code=401, detail="wrong name or password")
    auth.log_in(request, account, ctx)
    ctx.audit.record(account.name, "login", client_address=client_address(request))
    return SessionOut(name=account.name, role=account.role, csrf_token=auth.csrf_token(request))


@router.get("", response_model=SessionOut)
def whoami(user: auth.User, request: Request) -> SessionOut:
    return SessionOut(name=user.name, role=user.role, csrf_token=auth.csrf_token(request))


@router.delete("", status_code=204)
def log_out(user: auth.User, request: Request, ctx: Context) -> None:
    auth.log_out(request, ctx)
    ctx.audit.record(user.name, "logout", client_address=client_address(request))
