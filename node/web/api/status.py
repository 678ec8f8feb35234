"""Node status and dashboard numbers (admins), and the models this node runs."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from node.model_switches import set_enabled, switches
from node.users.accounts import Account
from node.web import auth
from node.web.context import Context, WebContext, client_address
from node.web.dashboard import Dashboard, dashboard
from node.web.model_catalogue import ModelInfo, card, models

router = APIRouter(prefix="/api", tags=["status"])


def node_dashboard(ctx: WebContext) -> Dashboard:
    workers = ctx.node.workers
    processes = [p for p in (workers.processes if workers else []) if p is not None]
    with ctx.sessions() as session:
        return dashboard(
            session,
            disk_free_bytes=ctx.store.free_bytes(),
            processes=len(processes),
            alive=sum(1 for p in processes if p.poll() is None),
        )


@router.get("/status", response_model=Dashboard)
def status(admin: auth.Admin, ctx: Context) -> Dashboard:
    """Studies per hour, median time to result, failures, pending exports, queues, disk."""
    return node_dashboard(ctx)


def node_models(ctx: WebContext) -> list[ModelInfo]:
    """The node's models with their on/off switch."""
    with ctx.sessions() as session:
        state = switches(session)
    out = []
    for info in models(ctx.settings.models.weights_dir):
        switch = state.get(info.name)
        out.append(
            info
            if switch is None
            else info.model_copy(
                update={
                    "enabled": switch.enabled,
                    "changed_by": switch.changed_by,
                    "changed_at": switch.changed_at,
                }
            )
        )
    return out


def switch_model(
    ctx: WebContext, request: Request, admin: Account, name: str, enabled: bool
) -> ModelInfo:
    """Switch a known model on or off, recorded on the model and in the audit trail."""
    if name not in {m.name for m in models(ctx.settings.models.weights_dir)}:
        raise HTTPException(404, "no such model")
    with ctx.sessions.begin() as session:
        set_enabled(session, name, enabled, admin.name)
    ctx.audit.record(
        admin.name,
        "model.enable" if enabled else "model.disable",
        detail=name,
        client_address=client_address(request),
    )
    return next(m for m in node_models(ctx) if m.name == name)


class ModelSwitchBody(BaseModel):
    enabled: bool


@router.get("/models", response_model=list[ModelInfo], tags=["models"])
def list_models(admin: auth.Admin, ctx: Context) -> list[ModelInfo]:
    """Models with metadata on this node (name, version, task, threshold, card, enabled)."""
    return node_models(ctx)


@router.put("/models/{name}/enabled", response_model=ModelInfo, tags=["models"])
def put_model_enabled(
    name: str, body: ModelSwitchBody, admin: auth.Admin, ctx: Context, request: Request
) -> ModelInfo:
    """Switch a model on or off; workers skip a disabled model from the next study on."""
    return switch_model(ctx, request, admin, name, body.enabled)


@router.get("/models/{name}/card", response_class=PlainTextResponse, tags=["models"])
def model_card(name: str, user: auth.User) -> PlainTextResponse:
    """The model card (Markdown): intended use, data, performance, limits."""
    text = card(name)
    if text is None:
        raise HTTPException(404, "no card for this model")
    return PlainTextResponse(text, media_type="text/markdown")
