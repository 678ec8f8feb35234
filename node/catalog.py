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
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, case, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db.dialects import insert_for
from node.db.engine import READ_ONLY
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
    #: Catalogued before and its file removed by retention (the caller writes it again).
    purged: bool = False


def _known(row: Any) -> Recorded:
    """An instance catalogued before: a duplicate, or ``purged`` (file removed by retention)."""
    return Recorded(
        row.study_id,
        row.study_version,
        is_new=False,
        reopened=False,
        purged=row.purged_at is not None,
    )


class _AlreadyRecorded(Exception):
    """The SOP Instance was inserted by someone else inside our transaction's window."""


class _IngestStatements:
    """The per-instance statements, built once (building and cache-keying them per call
    cost more CPU than executing them); parameters are bound at execution."""

    def __init__(self, engine: Engine) -> None:
        studies, series, instances = (cast(Table, m.__table__) for m in (Study, Series, Instance))
        self.find_instance = select(
            instances.c.study_id,
            instances.c.study_version,
            instances.c.purged_at,
        ).where(instances.c.sop_instance_uid == bindparam("uid"))
        self.count_duplicate = (
            update(instances)
            .where(instances.c.sop_instance_uid == bindparam("uid"))
            .values(duplicate_count=instances.c.duplicate_count + 1)
        )
        self.count_into_receiving_study = (
            update(studies)
            .where(
                studies.c.study_instance_uid == bindparam("uid"),
                studies.c.status == StudyStatus.RECEIVING,
            )
            .values(
                instance_count=studies.c.instance_count + 1,
                size_bytes=studies.c.size_bytes + bindparam("size"),
                last_received_at=bindparam("now", type_=studies.c.last_received_at.type),
            )
            .returning(
                studies.c.id,
                studies.c.version,
                studies.c.modalities,
                studies.c.body_part_examined,
            )
        )
        self.count_into_series = (
            update(series)
            .where(series.c.series_instance_uid == bindparam("uid"))
            .values(
                instance_count=series.c.instance_count + 1,
                last_received_at=bindparam("now", type_=series.c.last_received_at.type),
            )
            .returning(series.c.id)
        )
        insert = insert_for(engine, instances)
        columns = [c.name for c in instances.columns if c.name not in ("id", "purged_at")]
        self.insert_instance = (
            insert.values({name: bindparam(name) for name in columns})
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(instances.c.id)
        )


@dataclass(frozen=True, slots=True)
class CompletedStudy:
    study_id: int
    study_instance_uid: str
    version: int


#: Appended to a re-opened study's key finding until its new version is analysed.
PREVIOUS_VERSION = " (previous version)"

#: The key finding a re-opened study shows: the previous version's, said so (marked once,
#: however often the study re-opens before a result). The score, the flag and the urgency
#: it earned stay, so a possible pneumonia is not hidden while new images arrive; the
#: worker replaces both with the new version's result, and findings keep every version.
_KEY_FINDING_OF_PREVIOUS_VERSION = case(
    (Study.key_finding.endswith(PREVIOUS_VERSION), Study.key_finding),
    (func.length(Study.key_finding) > 64 - len(PREVIOUS_VERSION), Study.key_finding),
    else_=Study.key_finding + PREVIOUS_VERSION,
)

#: A study that had completed (or gone further) and receives again: its version goes up too.
_REOPENED: dict[str, Any] = {
    "key_finding": _KEY_FINDING_OF_PREVIOUS_VERSION,
    "status": StudyStatus.RECEIVING,
    "status_reason": None,
    "completed_at": None,
    "queued_at": None,
    "started_at": None,
    "finished_at": None,
    "attempts": 0,
    "lease_owner": None,
    "lease_until": None,
}


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
        self._sql = _IngestStatements(bind)

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self._engine.connect().execution_options(**{READ_ONLY: True}) as conn:
            found = conn.execute(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            return found is not None

    def restore_purged(
        self,
        sop_instance_uid: str,
        stored: StoredFile,
        place: Callable[[], object],
        now: datetime | None = None,
    ) -> bool:
        """A purged instance was sent again: point its row at the new file once more.

        One transaction: the row is claimed only while it is still purged, then
        ``place`` puts the file at ``stored``'s path, durably, and COMMIT comes
        last, as for a new instance. If another association or node restored it
        first, nothing is placed, the copy counts as a duplicate and False is
        returned.

        The study counts the instance as received ``now``, like a late one. So
        retention measures its age from the re-send (restored files are kept a
        full ``instances_days``, not purged again at the next run), and a study
        that had completed re-opens as a new version: completion, routing and the
        models run again, which is what re-sending a purged study is for (result
        UIDs do not depend on the version: destinations get replacements). Its
        ``purged_at`` clears when none of its instances is purged any longer.
        """
        now = now or utcnow()
        with self._engine.begin() as conn:
            # The study row is locked before the instance row, in the order that
            # ingest and retention take them (no deadlock with a purge).
            study = conn.execute(
                select(Study.id, Study.study_instance_uid, Study.status, Study.version)
                .where(
                    Study.id
                    == select(Instance.study_id)
                    .where(Instance.sop_instance_uid == sop_instance_uid)
                    .scalar_subquery()
                )
                .with_for_update()
            ).one()
            # The study counts the instance once, at its size as received: the copy
            # replaces the purged one's bytes (a sender may have re-encoded it).
            old_size = conn.execute(
                select(Instance.size_bytes).where(Instance.sop_instance_uid == sop_instance_uid)
            ).scalar_one()
            series_id = conn.execute(
                update(Instance)
                .where(
                    Instance.sop_instance_uid == sop_instance_uid,
                    Instance.purged_at.is_not(None),
                )
                .values(
                    path=stored.relative_path,
                    size_bytes=stored.size_bytes,
                    sha256=stored.sha256,
                    purged_at=None,
                    duplicate_count=Instance.duplicate_count + 1,
                )
                .returning(Instance.series_id)
            ).scalar()
            if series_id is None:
                conn.execute(self._sql.count_duplicate, {"uid": sop_instance_uid})
                return False
            place()
            reopened = study.status != StudyStatus.RECEIVING
            values: dict[str, Any] = {
                "last_received_at": now,
                "size_bytes": Study.size_bytes + (stored.size_bytes - old_size),
            }
            if reopened:
                values.update(_REOPENED, version=study.version + 1)
            still_purged = conn.execute(
                select(Instance.id).where(
                    Instance.study_id == study.id, Instance.purged_at.is_not(None)
                )
            ).first()
            if still_purged is None:
                values["purged_at"] = None
            conn.execute(update(Study).where(Study.id == study.id).values(**values))
            conn.execute(update(Series).where(Series.id == series_id).values(last_received_at=now))
        if reopened:
            log.info(
                "study re-opened study_uid=%s version=%d",
                study.study_instance_uid,
                study.version + 1,
            )
        return True

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
        start_write: Callable[[], Callable[[], object]] | None = None,
    ) -> Recorded:
        """Record one received instance, creating or updating its study and series.

        One transaction: it first looks the SOP Instance up (a copy already
        catalogued is counted as a duplicate, or reported as ``purged``), then
        calls ``start_write``, which starts writing the file and returns a wait
        for its durability; the statements run meanwhile and COMMIT comes after
        the wait, so a committed row always has its file and the disk wait and
        the SQL overlap. If anything raises, nothing is recorded.

        A study that had completed (or gone further) is re-opened as a new
        version: the newcomer is never dropped, and later stages see the bump.
        """
        now = now or utcnow()
        sql = self._sql
        uid = header.sop_instance_uid
        try:
            with self._engine.begin() as conn:
                found = conn.execute(sql.find_instance, {"uid": uid}).first()
                if found is not None:
                    if found.purged_at is None:
                        conn.execute(sql.count_duplicate, {"uid": uid})
                    return _known(found)
                wait_durable = start_write() if start_write is not None else None
                recorded = self._record_new(conn, header, stored, calling_ae_title, now)
                if wait_durable is not None:
                    wait_durable()
        except _AlreadyRecorded:
            # Another process inserted the same SOP Instance since the lookup.
            self.record_duplicate(uid)
            return self._existing(uid)
        if recorded.reopened:
            log.info(
                "study re-opened study_uid=%s version=%d",
                header.study_instance_uid,
                recorded.study_version,
            )
        return recorded

    def _existing(self, sop_instance_uid: str) -> Recorded:
        with self._engine.connect() as conn:
            row = conn.execute(self._sql.find_instance, {"uid": sop_instance_uid}).one()
        return _known(row)

    def _record_new(
        self,
        conn: Connection,
        header: InstanceHeader,
        stored: StoredFile,
        calling_ae_title: str,
        now: datetime,
    ) -> Recorded:
        """The statements for an instance not catalogued yet; the caller commits."""
        sql = self._sql
        # Common case, one statement: the study is receiving, count the instance in.
        study = conn.execute(
            sql.count_into_receiving_study,
            {"uid": header.study_instance_uid, "size": stored.size_bytes, "now": now},
        ).first()
        reopened = False
        if study is None:
            study, reopened = self._open_study(conn, header, stored, calling_ae_title, now)
        else:
            extra: dict[str, Any] = {}
            merged = _merge_modalities(study.modalities, header.modality)
            if merged != study.modalities:
                extra["modalities"] = merged
            if study.body_part_examined is None and header.body_part_examined:
                extra["body_part_examined"] = header.body_part_examined
            if extra:
                conn.execute(update(Study).where(Study.id == study.id).values(**extra))
        series_id = conn.execute(
            sql.count_into_series, {"uid": header.series_instance_uid, "now": now}
        ).scalar()
        if series_id is None:
            series_id = self._open_series(conn, study.id, header, now)
        inserted = conn.execute(
            sql.insert_instance,
            {
                "study_id": study.id,
                "series_id": series_id,
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "instance_number": header.instance_number,
                "rows": header.rows,
                "columns": header.columns,
                "number_of_frames": header.number_of_frames,
                "photometric_interpretation": header.photometric_interpretation,
                "path": stored.relative_path,
                "size_bytes": stored.size_bytes,
                "sha256": stored.sha256,
                "calling_ae_title": calling_ae_title,
                "received_at": now,
                "study_version": study.version,
                "duplicate_count": 0,
            },
        ).scalar()
        if inserted is None:
            raise _AlreadyRecorded  # rolls the counts back
        return Recorded(study.id, study.version, is_new=True, reopened=reopened)

    def _open_study(
        self,
        conn: Connection,
        header: InstanceHeader,
        stored: StoredFile,
        calling_ae_title: str,
        now: datetime,
    ) -> tuple[Any, bool]:
        """First instance of a study, or one that re-opens a completed study.

        Returns the study row as counted in (id, version, ...) and whether it re-opened.
        """
        conn.execute(
            insert_for(conn, Study)
            .values(
                study_instance_uid=header.study_instance_uid,
                accession_number=header.accession_number,
                patient_id=header.patient_id,
                patient_name=header.patient_name,
                patient_birth_date=header.patient_birth_date,
                patient_sex=header.patient_sex,
                study_date=header.study_date,
                study_time=header.study_time,
                study_description=header.study_description,
                referring_physician_name=header.referring_physician_name,
                modalities="",
                body_part_examined=header.body_part_examined,
                calling_ae_title=calling_ae_title,
                status=StudyStatus.RECEIVING,
                priority=0,
                version=1,
                series_count=0,
                instance_count=0,
                size_bytes=0,
                first_received_at=now,
                last_received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
        )
        study = conn.execute(
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
        values: dict[str, Any] = {
            "instance_count": Study.instance_count + 1,
            "size_bytes": Study.size_bytes + stored.size_bytes,
            "last_received_at": now,
            "modalities": _merge_modalities(study.modalities, header.modality),
        }
        if study.body_part_examined is None and header.body_part_examined:
            values["body_part_examined"] = header.body_part_examined
        if reopened:
            values.update(_REOPENED, version=version)
        counted = conn.execute(
            update(Study)
            .where(Study.id == study.id)
            .values(**values)
            .returning(Study.id, Study.version)
        ).one()
        return counted, reopened

    @staticmethod
    def _open_series(conn: Connection, study_id: int, header: InstanceHeader, now: datetime) -> int:
        series_id = conn.execute(
            insert_for(conn, Series)
            .values(
                study_id=study_id,
                series_instance_uid=header.series_instance_uid,
                modality=header.modality,
                series_number=header.series_number,
                series_description=header.series_description,
                body_part_examined=header.body_part_examined,
                instance_count=1,
                first_received_at=now,
                last_received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
            .returning(Series.id)
        ).scalar()
        if series_id is None:  # inserted since the UPDATE by another process: count it there
            return int(
                conn.execute(
                    update(Series)
                    .where(Series.series_instance_uid == header.series_instance_uid)
                    .values(instance_count=Series.instance_count + 1, last_received_at=now)
                    .returning(Series.id)
                ).scalar_one()
            )
        conn.execute(
            update(Study).where(Study.id == study_id).values(series_count=Study.series_count + 1)
        )
        return int(series_id)

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
