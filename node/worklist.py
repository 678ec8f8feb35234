"""The read side of the catalogue: studies as a worklist shows them, most urgent first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Priority, Study


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


def list_studies(session: Session, *, limit: int = 100, offset: int = 0) -> list[StudySummary]:
    """Studies in worklist order: priority (STAT first), model score, then oldest first.

    Within a priority, the higher pneumonia probability reads first; studies not yet
    scored come after scored ones; ties go to the study waiting longest.
    """
    rows = session.execute(
        select(Study)
        .order_by(
            Study.priority.desc(),
            Study.key_score.desc().nulls_last(),
            Study.last_received_at.asc(),
            Study.id.asc(),
        )
        .limit(limit)
        .offset(offset)
    ).scalars()
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
