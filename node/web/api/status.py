"""Node status and dashboard numbers (admins), and the models this node runs."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from node.web import auth
from node.web.context import Context, WebContext
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


@router.get("/models", response_model=list[ModelInfo], tags=["models"])
def list_models(admin: auth.Admin, ctx: Context) -> list[ModelInfo]:
    """Models with metadata on this node (name, version, task, threshold, card)."""
    return models(ctx.settings.models.weights_dir)


@router.get("/models/{name}/card", response_class=PlainTextResponse, tags=["models"])
def model_card(name: str, user: auth.User) -> PlainTextResponse:
    """The model card (Markdown): intended use, data, performance, limits."""
    text = card(name)
    if text is None:
        raise HTTPException(404, "no card for this model")
    return PlainTextResponse(text, media_type="text/markdown")
