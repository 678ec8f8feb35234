"""Destinations (admins): the configured AEs, their delivery counts, and a C-ECHO test."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from node.db.models import Export
from node.verification import echo_destination
from node.web import auth
from node.web.context import Context, WebContext, client_address

router = APIRouter(prefix="/api/destinations", tags=["destinations"])


class DestinationOut(BaseModel):
    name: str
    ae_title: str
    host: str
    port: int
    kinds: list[str]
    send_original: bool
    deliveries: dict[str, int]


class EchoOut(BaseModel):
    ok: bool
    detail: str


def destinations(ctx: WebContext) -> list[DestinationOut]:
    with ctx.sessions() as session:
        counts: dict[str, dict[str, int]] = {}
        for name, state, count in session.execute(
            select(Export.destination, Export.state, func.count()).group_by(
                Export.destination, Export.state
            )
        ):
            counts.setdefault(name, {})[str(state)] = int(count)
    return [
        DestinationOut(
            name=d.name,
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            kinds=list(d.kinds),
            send_original=d.send_original,
            deliveries=counts.get(d.name, {}),
        )
        for d in ctx.settings.destinations
    ]


@router.get("", response_model=list[DestinationOut])
def list_destinations(admin: auth.Admin, ctx: Context) -> list[DestinationOut]:
    return destinations(ctx)


@router.post("/{name}/echo", response_model=EchoOut)
def echo(name: str, admin: auth.Admin, ctx: Context, request: Request) -> EchoOut:
    """C-ECHO the destination (PS3.4 Annex A) as an export reaches it: calling AE title, TLS."""
    dest = ctx.settings.destination(name)
    if dest is None:
        raise HTTPException(404, "no such destination")
    result = echo_destination(
        ctx.settings, dest, timeout=min(ctx.settings.export.timeout_seconds, 10.0)
    )
    ctx.audit.record(
        admin.name,
        "destination.echo",
        detail=f"{name}: {result.detail}",
        client_address=client_address(request),
    )
    return EchoOut(ok=result.ok, detail=result.detail)
