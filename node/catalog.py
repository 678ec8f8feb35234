"""The study catalogue's write side: recording received instances and completing studies.

Every function runs one short transaction. Recording is idempotent on the SOP
Instance UID (a unique constraint, not a check-then-insert), so a re-sent
instance is counted as a duplicate, never stored twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.dialects import insert_for
from node.db.models import Instance, QuarantinedInstance, Series, Study, StudyStatus
from node.db.types import utcnow
from node.ingest.inspect import InstanceHeader
from node.storage import StoredFile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recorded:
    """Outcome of recording one instance."""

    study_id: int
    study_version: int
    is_new: bool
    reopened: bool


@dataclass(frozen=True, slots=True)
class CompletedStudy:
    study_id: int
    study_instance_uid: str
    version: int


def _merge_modalities(current: str, modality: str | None) -> str:
    if not modality:
        return current
    values = [m for m in current.split("\\") if m]
    if modality not in values:
        values.append(modality)
    return "\\".join(values)[:64]


class Catalog:
    """Write access to studies/series/instances for the ingest path."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        # The ingest path runs Core statements on a Connection: per instance, the
        # ORM Session's bookkeeping cost more CPU than the statements themselves.
        bind = sessions.kw["bind"]
        assert isinstance(bind, Engine)
        self._engine = bind

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._engine.connect() as conn:
            found = conn.execute(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            return found is not None

    def is_purged(self, sop_instance_uid: str) -> bool:
        """The instance is catalogued but its file was removed by the retention policy."""
        with self._engine.connect() as conn:
            found = conn.execute(
                select(Instance.id).where(
                    Instance.sop_instance_uid == sop_instance_uid, Instance.purged_at.is_not(None)
                )
            ).first()
            return found is not None

    def restore_purged(self, sop_instance_uid: str, stored: StoredFile) -> None:
        """A purged instance was sent again: its row points at the new file once more.

        The study keeps its state and results (the same bytes give the same findings);
        its ``purged_at`` clears when none of its instances is purged any longer.
        """
        with self._engine.begin() as conn:
            study_id = conn.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .values(
                    path=stored.relative_path,
                    size_bytes=stored.size_bytes,
                    sha256=stored.sha256,
                    purged_at=None,
                    duplicate_count=Instance.duplicate_count + 1,
                )
                .returning(Instance.study_id)
            ).scalar_one()
            still_purged = conn.execute(
                select(Instance.id).where(
                    Instance.study_id == study_id, Instance.purged_at.is_not(None)
                )
            ).first()
            if still_purged is None:
                conn.execute(update(Study).where(Study.id == study_id).values(purged_at=None))

    def record_duplicate(self, sop_instance_uid: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .values(duplicate_count=Instance.duplicate_count + 1)
            )

    def record_instance(
        self,
        header: InstanceHeader,
        stored: StoredFile,
        calling_ae_title: str,
        now: datetime | None = None,
        *,
        before_commit: Callable[[], object] | None = None,
    ) -> Recorded:
        """Record one stored instance, creating or updating its study and series.

        A study that had completed (or gone further) is re-opened as a new
        version: the newcomer is never dropped, and later stages see the bump.

        ``before_commit`` runs inside the transaction after every statement,
        just before COMMIT; if it raises, nothing is recorded. The SCP passes
        "wait until the file is durable" here: the statements run while the
        file is fsynced, and a committed row still always has its file.
        """
        now = now or utcnow()
        with self._engine.begin() as session:
            study_values = {
                "study_instance_uid": header.study_instance_uid,
                "accession_number": header.accession_number,
                "patient_id": header.patient_id,
                "patient_name": header.patient_name,
                "patient_birth_date": header.patient_birth_date,
                "patient_sex": header.patient_sex,
                "study_date": header.study_date,
                "study_time": header.study_time,
                "study_description": header.study_description,
                "referring_physician_name": header.referring_physician_name,
                "modalities": "",
                "body_part_examined": header.body_part_examined,
                "calling_ae_title": calling_ae_title,
                "status": StudyStatus.RECEIVING,
                "priority": 0,
                "version": 1,
                "series_count": 0,
                "instance_count": 0,
                "size_bytes": 0,
                "first_received_at": now,
                "last_received_at": now,
            }
            session.execute(
                insert_for(session, Study)
                .values(**study_values)
                .on_conflict_do_nothing(index_elements=["study_instance_uid"])
            )
            study = session.execute(
                select(
                    Study.id,
                    Study.status,
                    Study.version,
                    Study.modalities,
                    Study.body_part_examined,
                )
                .where(Study.study_instance_uid == header.study_instance_uid)
                .with_for_update()
            ).one()
            reopened = study.status != StudyStatus.RECEIVING
            version = study.version + 1 if reopened else study.version

            new_series_id = session.execute(
                insert_for(session, Series)
                .values(
                    study_id=study.id,
                    series_instance_uid=header.series_instance_uid,
                    modality=header.modality,
                    series_number=header.series_number,
                    series_description=header.series_description,
                    body_part_examined=header.body_part_examined,
                    instance_count=0,
                    first_received_at=now,
                    last_received_at=now,
                )
                .on_conflict_do_nothing(index_elements=["series_instance_uid"])
                .returning(Series.id)
            ).scalar()
            series_new = new_series_id is not None
            series_id = (
                new_series_id
                or session.execute(
                    select(Series.id).where(
                        Series.series_instance_uid == header.series_instance_uid
                    )
                ).scalar_one()
            )

            # RETURNING yields no row when the SOP Instance is already there.
            inserted_id = session.execute(
                insert_for(session, Instance)
                .values(
                    study_id=study.id,
                    series_id=series_id,
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    transfer_syntax_uid=header.transfer_syntax_uid,
                    instance_number=header.instance_number,
                    rows=header.rows,
                    columns=header.columns,
                    number_of_frames=header.number_of_frames,
                    photometric_interpretation=header.photometric_interpretation,
                    path=stored.relative_path,
                    size_bytes=stored.size_bytes,
                    sha256=stored.sha256,
                    calling_ae_title=calling_ae_title,
                    received_at=now,
                    study_version=version,
                    duplicate_count=0,
                )
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(Instance.id)
            ).scalar()
            if inserted_id is None:
                session.execute(
                    update(Instance)
                    .where(Instance.sop_instance_uid == header.sop_instance_uid)
                    .values(duplicate_count=Instance.duplicate_count + 1)
                )
                if before_commit is not None:
                    before_commit()
                return Recorded(study.id, study.version, is_new=False, reopened=False)

            study_update: dict[str, Any] = {
                "instance_count": Study.instance_count + 1,
                "size_bytes": Study.size_bytes + stored.size_bytes,
                "last_received_at": now,
                "modalities": _merge_modalities(study.modalities, header.modality),
            }
            if series_new:
                study_update["series_count"] = Study.series_count + 1
            if study.body_part_examined is None and header.body_part_examined:
                study_update["body_part_examined"] = header.body_part_examined
            if reopened:
                study_update.update(
                    status=StudyStatus.RECEIVING,
                    status_reason=None,
                    version=version,
                    completed_at=None,
                    queued_at=None,
                    started_at=None,
                    finished_at=None,
                    attempts=0,
                    lease_owner=None,
                    lease_until=None,
                )
            session.execute(update(Study).where(Study.id == study.id).values(**study_update))
            session.execute(
                update(Series)
                .where(Series.id == series_id)
                .values(instance_count=Series.instance_count + 1, last_received_at=now)
            )
            if before_commit is not None:
                before_commit()
        if reopened:
            log.info("study re-opened study_uid=%s version=%d", header.study_instance_uid, version)
        return Recorded(study.id, version, is_new=True, reopened=reopened)

    def record_quarantine(
        self,
        *,
        calling_ae_title: str,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        status: int,
        reason: str,
        path: str,
        size_bytes: int,
    ) -> None:
        with self._sessions.begin() as session:
            session.add(
                QuarantinedInstance(
                    received_at=utcnow(),
                    calling_ae_title=calling_ae_title,
                    sop_class_uid=(sop_class_uid or "")[:64] or None,
                    sop_instance_uid=(sop_instance_uid or "")[:64] or None,
                    status=status,
                    reason=reason,
                    path=path,
                    size_bytes=size_bytes,
                )
            )

    def complete_quiet_studies(
        self, quiet_seconds: float, now: datetime | None = None
    ) -> Sequence[CompletedStudy]:
        """Mark complete every receiving study that has been quiet for ``quiet_seconds``."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=quiet_seconds)
        with self._sessions.begin() as session:
            rows = session.execute(
                update(Study)
                .where(Study.status == StudyStatus.RECEIVING, Study.last_received_at <= cutoff)
                .values(status=StudyStatus.COMPLETE, completed_at=now)
                .returning(Study.id, Study.study_instance_uid, Study.version)
            ).all()
        done = [CompletedStudy(r.id, r.study_instance_uid, r.version) for r in rows]
        for study in done:
            log.info(
                "study complete study_uid=%s version=%d", study.study_instance_uid, study.version
            )
        return done

    def counts(self) -> dict[str, int]:
        """Number of studies per status (for status pages and metrics)."""
        with self._sessions() as session:
            rows = session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
        return {str(status): int(n) for status, n in rows}
