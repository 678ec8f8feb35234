"""The read side of the catalogue: studies as a worklist shows them, most urgent first."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from node.db.matching import holds_item
from node.db.models import Priority, Study, StudyMark


@dataclass(frozen=True, slots=True)
class StudySummary:
    study_instance_uid: str
    accession_number: str | None
    modalities: str
    instance_count: int
    series_count: int
    status: str
    priority: str
    version: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    finished_at: datetime | None
    key_finding: str | None
    key_score: float | None
    status_reason: str | None
    routing_rule: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "StudyInstanceUID": self.study_instance_uid,
            "AccessionNumber": self.accession_number,
            "Modality": self.modalities,
            "instances": self.instance_count,
            "series": self.series_count,
            "status": self.status,
            "priority": self.priority,
            "version": self.version,
            "first_received": self.first_received_at.isoformat(),
            "last_received": self.last_received_at.isoformat(),
            "completed": self.completed_at.isoformat() if self.completed_at else None,
            "finished": self.finished_at.isoformat() if self.finished_at else None,
            "finding": self.key_finding,
            "probability": self.key_score,
            "rule": self.routing_rule,
            "reason": self.status_reason,
        }


#: Worklist order; ``ix_studies_worklist`` follows it. Waiting time counts from the first
#: instance: a late instance must not move a study behind newer ones. The id makes the
#: order total, so that pages do not overlap or skip a study.
_ORDER = (
    Study.priority.desc(),
    Study.key_score.desc().nulls_last(),
    Study.first_received_at.asc(),
    Study.id.asc(),
)


def list_studies(session: Session, *, limit: int = 100, offset: int = 0) -> list[StudySummary]:
    """Studies in worklist order: priority (STAT first), model score, then oldest first.

    Within a priority, the higher pneumonia probability reads first; studies not yet
    scored come after scored ones; ties go to the study waiting longest.
    """
    rows = session.execute(select(Study).order_by(*_ORDER).limit(limit).offset(offset)).scalars()
    return [
        StudySummary(
            study_instance_uid=s.study_instance_uid,
            accession_number=s.accession_number,
            modalities=s.modalities,
            instance_count=s.instance_count,
            series_count=s.series_count,
            status=str(s.status),
            priority=Priority(s.priority).name.lower(),
            version=s.version,
            first_received_at=s.first_received_at,
            last_received_at=s.last_received_at,
            completed_at=s.completed_at,
            finished_at=s.finished_at,
            key_finding=s.key_finding,
            key_score=s.key_score,
            status_reason=s.status_reason,
            routing_rule=s.routing_rule,
        )
        for s in rows
    ]


# -- the web worklist: filters, search, one page at a time -----------------------------


@dataclass(frozen=True, slots=True)
class WorklistFilter:
    """What a radiologist narrows the worklist to; every field optional."""

    statuses: tuple[str, ...] = ()
    #: One modality; matches studies whose ModalitiesInStudy list it (CT: not OCT).
    modality: str | None = None
    priority: Priority | None = None
    #: Received on or after / before (UTC).
    received_from: datetime | None = None
    received_before: datetime | None = None
    #: Exact AccessionNumber or PatientID.
    search: str | None = None
    unread_only: bool = False


@dataclass(slots=True)
class Marks:
    """Who marked a study read, and who reviewed it, first first."""

    readers: list[str] = field(default_factory=list)
    reviewers: list[str] = field(default_factory=list)


def marks_of(session: Session, study_ids: Collection[int]) -> dict[int, Marks]:
    """The marks of each of these studies that has any (one statement; none for none)."""
    out: dict[int, Marks] = {}
    if not study_ids:
        return out
    rows = session.execute(
        select(StudyMark.study_id, StudyMark.mark, StudyMark.user_name)
        .where(StudyMark.study_id.in_(study_ids))
        .order_by(StudyMark.marked_at, StudyMark.id)
    )
    for study_id, kind, user_name in rows:
        marks = out.setdefault(study_id, Marks())
        (marks.reviewers if kind == "reviewed" else marks.readers).append(user_name)
    return out


@dataclass(frozen=True, slots=True)
class WorklistRow:
    """One worklist line: what the web page and the REST API show of a study."""

    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None
    modalities: str
    study_description: str | None
    study_date: str | None
    first_received_at: datetime
    status: str
    priority: Priority
    key_finding: str | None
    key_score: float | None
    instance_count: int
    read_at: datetime | None
    #: The first to mark it read / reviewed.
    read_by: str | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    #: Everyone who marked it read / reviewed, first first.
    readers: tuple[str, ...] = ()
    reviewers: tuple[str, ...] = ()


_ROW_COLUMNS = (
    Study.id,
    Study.study_instance_uid,
    Study.patient_name,
    Study.patient_id,
    Study.accession_number,
    Study.modalities,
    Study.study_description,
    Study.study_date,
    Study.first_received_at,
    Study.status,
    Study.priority,
    Study.key_finding,
    Study.key_score,
    Study.instance_count,
    Study.read_at,
    Study.read_by,
    Study.reviewed_at,
    Study.reviewed_by,
)


def _where(query: WorklistFilter) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if query.statuses:
        clauses.append(Study.status.in_(query.statuses))
    if query.modality:
        clauses.append(holds_item(Study.modalities, query.modality, "\\"))  # whole item
    if query.priority is not None:
        clauses.append(Study.priority == int(query.priority))
    if query.received_from is not None:
        clauses.append(Study.first_received_at >= query.received_from)
    if query.received_before is not None:
        clauses.append(Study.first_received_at < query.received_before)
    if query.search:
        clauses.append(
            or_(Study.accession_number == query.search, Study.patient_id == query.search)
        )
    if query.unread_only:
        clauses.append(Study.read_at.is_(None))
    return clauses


def worklist_page(
    session: Session, query: WorklistFilter, *, limit: int, offset: int = 0
) -> tuple[list[WorklistRow], bool]:
    """One page of the worklist in :func:`list_studies` order, and whether more follow.

    One statement, whatever the page or the table size: the page is read with
    ``limit + 1`` rows instead of a ``COUNT`` over the whole (filtered) table; one more
    for the names of the readers when studies on the page have been read.
    """
    found = session.execute(
        select(*_ROW_COLUMNS)
        .where(*_where(query))
        .order_by(*_ORDER)
        .limit(limit + 1)
        .offset(offset)
    ).all()
    rows, more = found[:limit], len(found) > limit
    marks = marks_of(session, [r.id for r in rows if r.read_at is not None])
    none = Marks()
    out = [
        WorklistRow(
            study_instance_uid=r.study_instance_uid,
            patient_name=r.patient_name,
            patient_id=r.patient_id,
            accession_number=r.accession_number,
            modalities=r.modalities,
            study_description=r.study_description,
            study_date=r.study_date,
            first_received_at=r.first_received_at,
            status=str(r.status),
            priority=Priority(r.priority),
            key_finding=r.key_finding,
            key_score=r.key_score,
            instance_count=r.instance_count,
            read_at=r.read_at,
            read_by=r.read_by,
            reviewed_at=r.reviewed_at,
            reviewed_by=r.reviewed_by,
            readers=tuple(marks.get(r.id, none).readers),
            reviewers=tuple(marks.get(r.id, none).reviewers),
        )
        for r in rows
    ]
    return out, more


def worklist_fingerprint(session: Session) -> str:
    """A short value that changes whenever a study arrives, changes in any way, or goes.

    An open worklist polls this (no patient data, cheap) and reloads its rows only
    when it changes. ``updated_at`` moves with every write to a study (status, priority,
    finding, read marks, ...); the count catches deletions.
    """
    # One scalar subquery per value: max() is then a single index lookup (the min/max
    # shortcut of SQLite and PostgreSQL applies to a lone aggregate only), so polling
    # costs the same with 100 000 studies as with 10.
    row = session.execute(
        select(
            select(func.count(Study.id)).scalar_subquery(),
            select(func.max(Study.updated_at)).scalar_subquery(),
        )
    ).one()
    return "|".join("" if v is None else str(v) for v in row)
