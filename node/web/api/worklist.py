"""The worklist: studies in reading order, filtered, one page at a time."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from node.db.models import Priority, StudyStatus
from node.web import auth
from node.web.audit import listing
from node.web.context import Context, Offset, client_address
from node.worklist import WorklistFilter, WorklistRow, worklist_fingerprint, worklist_page

router = APIRouter(prefix="/api/worklist", tags=["worklist"])


class WorklistItem(BaseModel):
    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    modalities: str
    study_description: str | None
    received_at: datetime
    status: str
    priority: str
    key_finding: str | None
    key_score: float | None
    #: "high" (>= the escalation threshold), "medium" (>= half of it), "low", or None.
    flag: str | None
    #: The first to mark it read / reviewed; ``readers`` / ``reviewers`` name everyone.
    read_by: str | None
    reviewed_by: str | None
    readers: list[str]
    reviewers: list[str]


class WorklistPage(BaseModel):
    items: list[WorklistItem]
    offset: int
    limit: int
    has_more: bool
    fingerprint: str


class Fingerprint(BaseModel):
    fingerprint: str


def flag(score: float | None, threshold: float) -> str | None:
    if score is None:
        return None
    if score >= threshold:
        return "high"
    return "medium" if score >= threshold / 2 else "low"


def item(row: WorklistRow, threshold: float) -> WorklistItem:
    return WorklistItem(
        study_instance_uid=row.study_instance_uid,
        patient_name=row.patient_name,
        patient_id=row.patient_id,
        accession_number=row.accession_number,
        modalities=row.modalities,
        study_description=row.study_description,
        received_at=row.first_received_at,
        status=row.status,
        priority=row.priority.name.lower(),
        key_finding=row.key_finding,
        key_score=row.key_score,
        flag=flag(row.key_score, threshold),
        read_by=row.read_by,
        reviewed_by=row.reviewed_by,
        readers=list(row.readers),
        reviewers=list(row.reviewers),
    )


class WorklistParams(BaseModel):
    status: list[StudyStatus] = []
    modality: str | None = None
    priority: Priority | None = None
    received_from: date | None = None
    received_to: date | None = None
    q: str | None = None
    unread: bool = False

    def to_filter(self) -> WorklistFilter:
        return WorklistFilter(
            statuses=tuple(str(s) for s in self.status),
            modality=self.modality.strip().upper() if self.modality else None,
            priority=self.priority,
            received_from=_start_of(self.received_from),
            received_before=_start_of(self.received_to, next_day=True),
            search=self.q.strip() if self.q and self.q.strip() else None,
            unread_only=self.unread,
        )

    def describe(self) -> str:
        """The filters for the audit trail (a search term may be a patient ID: not logged)."""
        fields = self.model_dump(exclude={"q"}, mode="json")
        parts = [f"{k}={v}" for k, v in fields.items() if v]
        if self.q:
            parts.append("search")
        return " ".join(parts)


def _start_of(day: date | None, *, next_day: bool = False) -> datetime | None:
    if day is None:
        return None
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start + timedelta(days=1) if next_day else start


@router.get("", response_model=WorklistPage)
def worklist(
    *,
    user: auth.User,
    ctx: Context,
    request: Request,
    params: Annotated[WorklistParams, Query()],
    offset: Offset = 0,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
) -> WorklistPage:
    """Studies in reading order: STAT, urgent, routine; then model score; then oldest first."""
    size = limit or ctx.settings.web.page_size
    with ctx.reads() as session:
        rows, more = worklist_page(session, params.to_filter(), limit=size, offset=offset)
        fp = worklist_fingerprint(session)
    ctx.audit.record(
        user.name,
        "worklist.api",
        detail=listing(params.describe(), [r.study_instance_uid for r in rows]),
        client_address=client_address(request),
    )
    threshold = ctx.settings.pipeline.escalate_threshold
    return WorklistPage(
        items=[item(r, threshold) for r in rows],
        offset=offset,
        limit=size,
        has_more=more,
        fingerprint=fp,
    )


@router.get("/fingerprint", response_model=Fingerprint)
def fingerprint(user: auth.User, ctx: Context) -> Fingerprint:
    """Changes whenever the worklist would; no patient data (polled by open worklists)."""
    with ctx.reads() as session:
        return Fingerprint(fingerprint=worklist_fingerprint(session))
