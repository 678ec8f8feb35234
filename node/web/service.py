"""HTTP endpoints for machines: liveness, readiness, Prometheus metrics; the DICOM role's app.

``/healthz`` (liveness) and ``/readyz`` (readiness) answer load balancers and
orchestrators; ``/metrics`` answers Prometheus (``web.metrics``). None needs a
login and none reveals patient data: component names, reasons, counts. The
DICOM role serves them with the internal API (token-authenticated, for workers
and the web role) and nothing else: no pages, no login, no REST API for people.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response

from node import __version__
from node.observability.metrics import (
    CONTENT_TYPE,
    NodeCollector,
    exposition,
    node_registry,
)
from node.web.internal import internal_router

if TYPE_CHECKING:
    from node.runtime import Node


def health_router(node: Node) -> APIRouter:
    """/healthz, /readyz and (when ``web.metrics``) /metrics of ``node``'s role."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz() -> JSONResponse:
        """Liveness: 200 while every component thread of this role runs, else 503."""
        components = node.components()
        alive = all(components.values())
        body: dict[str, Any] = {
            "status": "ok" if alive else "failing",
            "role": node.role,
            "version": __version__,
            "components": components,
        }
        running, configured = node.worker_processes()
        if configured:
            # Dead workers are restarted by the node: reported, not a liveness failure.
            body["workers"] = {"running": running, "configured": configured}
        return JSONResponse(body, status_code=200 if alive else 503)

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: database at the current schema, listener, broker, disk (by role)."""
        reasons = node.readiness_problems()
        body = {"status": "not ready" if reasons else "ready", "role": node.role}
        return JSONResponse({**body, "reasons": reasons}, status_code=503 if reasons else 200)

    if node.settings.web.metrics:
        registry = node_registry(
            NodeCollector(node.sessions, node.store.free_bytes, node.celery),
            embedded_workers=(
                node.store.data_dir / "worker-metrics" if node.workers is not None else None
            ),
        )

        @router.get("/metrics")
        def metrics() -> Response:
            """Prometheus text format: this process's counters and the shared gauges."""
            return Response(exposition(registry), media_type=CONTENT_TYPE)

    return router


def create_service_app(node: Node) -> FastAPI:
    """The DICOM role's HTTP app: health, metrics and the internal API only."""
    app = FastAPI(
        title="triage-node service",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(health_router(node))
    app.include_router(internal_router(node))
    return app
