"""A queued study row, as routing leaves it, for tests of what happens next."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Study, StudyStatus
from node.db.types import utcnow


def queued_study(sessions: sessionmaker[Session], uid: str, models: list[str]) -> int:
    """Insert a study routed to ``models`` and queued; return its id."""
    now = utcnow()
    with sessions.begin() as session:
        study = Study(
            study_instance_uid=uid,
            calling_ae_title="CR1",
            status=StudyStatus.QUEUED,
            priority=0,
            version=1,
            modalities="CR",
            first_received_at=now,
            last_received_at=now,
            queued_at=now,
            routing_models=models,
            routing_series=[],
        )
        session.add(study)
        session.flush()
        return study.id
