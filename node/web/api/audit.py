"""The audit trail (admins): browse and export as CSV."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from node.web import auth
from node.web.audit import AuditQuery, csv_lines
from node.web.context import Context, client_address

router = APIRouter(prefix="/api/audit", tags=["audit"])


class AuditEventOut(BaseModel):
    id: int
    time: datetime
    user_name: str
    action: str
    study_instance_uid: str | None
    detail: str | None
    client_address: str | None


class AuditParams(BaseModel):
    """Filters of the page and the API; ISO 8601 times without a time zone are UTC."""

    user: str | None = None
    action: str | None = None
    study_uid: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def to_query(self) -> AuditQuery:
        return AuditQuery(self.user, self.action, self.study_uid, self.since, self.until)

    def describe(self) -> str:
        """The filters for the audit trail: which events an export took."""
        parts = [f"{k}={v}" for k, v in self.model_dump(mode="json").items() if v]
        return " ".join(parts) or "all events"


@router.get("", response_model=list[AuditEventOut])
def audit_events(
    admin: auth.Admin,
    ctx: Context,
    params: Annotated[AuditParams, Query()],
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventOut]:
    """Audit events, newest first."""
    return [
        AuditEventOut(**asdict(r))
        for r in ctx.audit.list(params.to_query(), limit=limit, offset=offset)
    ]


@router.get("/export.csv", response_class=StreamingResponse)
def audit_csv(
    admin: auth.Admin, ctx: Context, request: Request, params: Annotated[AuditParams, Query()]
) -> StreamingResponse:
    """Every matching audit event as CSV."""
    ctx.audit.record(
        admin.name,
        "audit.export",
        detail=params.describe(),
        client_address=client_address(request),
    )
    return StreamingResponse(
        csv_lines(ctx.audit.all(params.to_query())),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
    )
