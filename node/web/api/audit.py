"""The audit trail (admins): browse and export as CSV."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Self

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, model_validator

from node.web import auth
from node.web.audit import AuditQuery, csv_lines, utc
from node.web.context import Context, Offset, client_address

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
    """Filters of the page and the API; ISO 8601 times without a time zone are UTC.

    ``from`` and ``to`` are whole UTC days, both included (the audit page's date
    inputs); with ``since`` / ``until`` as well, the narrower bound holds.
    """

    user: str | None = None
    action: str | None = None
    study_uid: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    from_: date | None = Field(default=None, alias="from")
    to: date | None = None

    @model_validator(mode="after")
    def _days_in_order(self) -> Self:
        if self.from_ and self.to and self.from_ > self.to:
            raise ValueError("from is after to")
        return self

    def to_query(self) -> AuditQuery:
        since = _later(self.since, _day_start(self.from_))
        until = _earlier(self.until, _day_start(self.to, next_day=True))
        return AuditQuery(self.user, self.action, self.study_uid, since, until)

    def fields(self) -> dict[str, str]:
        """The filters set, as query parameters (links to other pages and the export)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return {k: str(v) for k, v in data.items() if v}

    def describe(self) -> str:
        """The filters for the audit trail: which events an export took."""
        return " ".join(f"{k}={v}" for k, v in self.fields().items()) or "all events"


def _day_start(day: date | None, *, next_day: bool = False) -> datetime | None:
    if day is None:
        return None
    return datetime.combine(day + timedelta(days=1) if next_day else day, time(0), tzinfo=UTC)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(utc(a), b)


def _earlier(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(utc(a), b)


@router.get("", response_model=list[AuditEventOut])
def audit_events(
    admin: auth.Admin,
    ctx: Context,
    params: Annotated[AuditParams, Query()],
    offset: Offset = 0,
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
