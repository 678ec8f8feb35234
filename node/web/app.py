"""FastAPI application factory.

Only endpoints without patient data live here so far; the worklist, login and
audit arrive with the worklist issue and will require authentication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from node.runtime import Node


def create_app(node: Node) -> FastAPI:
    app = FastAPI(title="triage-node", version="0.1.0")

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Liveness and a summary without patient data: listener, disk, study counts."""
        body: dict[str, Any] = {
            "status": "ok",
            "dicom": {"ae_title": node.settings.dicom.ae_title, "port": node.dicom.port},
            "disk_free_bytes": node.store.free_bytes(),
            "studies": node.catalog.counts(),
        }
        return JSONResponse(body)

    return app
