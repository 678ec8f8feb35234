"""HTTP endpoints for machines: liveness and Prometheus metrics.

``/healthz`` (liveness) answers load balancers and orchestrators, ``/metrics``
Prometheus (``web.metrics``); readiness (``/readyz``, each check by name) is
:mod:`node.observability.readiness`. None needs a login and none reveals patient
data: component names, reasons, counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from node import __version__
from node.observability.metrics import (
    CONTENT_TYPE,
    NodeCollector,
    exposition,
    node_registry,
)

if TYPE_CHECKING:
    from node.runtime import Node


def health_router(node: Node) -> APIRouter:
    """/healthz and (when ``web.metrics``) /metrics of ``node``'s role."""
    router = APIRouter(tags=["health"])

    @router.api_route("/healthz", methods=["GET", "HEAD"])
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
