"""``/readyz``: whether this process should get traffic now, each check by name.

The JSON names every check of the role (``database``, ``storage``,
``dicom_listener``, ``broker``) with ``ok`` and, when failing, a ``detail``;
``reasons`` lists the details together. HTTP 503 while any check fails. Liveness
(``/healthz``, cheap: the component threads run) stays with the service router.
No login; nothing about patients: component names and exception types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from node.runtime import Node


def readiness_router(node: Node) -> APIRouter:
    """``/readyz`` of ``node``'s role; include it before the service router's routes."""
    router = APIRouter(tags=["health"])

    @router.api_route("/readyz", methods=["GET", "HEAD"])
    def readyz() -> JSONResponse:
        """Readiness: listener accepting, database answering, storage writable (by role)."""
        checks = node.readiness()
        reasons = [problem for check in checks for problem in check.problems]
        body = {
            "status": "not ready" if reasons else "ready",
            "role": node.role,
            "checks": {check.name: check.as_json() for check in checks},
            "reasons": reasons,
        }
        return JSONResponse(body, status_code=503 if reasons else 200)

    return router
