"""Retention: delete received images (and quarantined files) once they are no longer needed.

A study's instance files are purged ``retention.instances_days`` after its last instance
arrived, and only when nothing still needs them: processing has ended (done, failed or
not routed; never while complete, queued or processing) and no delivery of it is pending
(a forwarded original is read from the store at send time). Rows stay: findings, result
objects and their metadata, deliveries and the audit trail keep referring to the study;
``purged_at`` on the study and its instances says when the files went. A purged
instance sent again arrives like a late one (``Catalog.restore_purged``): the study
re-opens, and its files are kept for a full period from then.

Quarantined files are purged ``retention.quarantine_days`` after they were refused.

A file that cannot be deleted (permissions, I/O error) is not purged: its row loses
the mark again, the report (and the audit event, if other files went) counts it as
failed, not as gone, and the next run tries again. A file already missing counts as
deleted.

Every purge is one audit event (user ``system:retention``) with UIDs and counts, never
patient data.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import RetentionSettings
from node.db.models import (
    Export,
    ExportState,
    Instance,
    QuarantinedInstance,
    Study,
    StudyStatus,
)
from node.db.types import utcnow
from node.storage import InstanceStore
from node.web.audit import AuditTrail

log = logging.getLogger(__name__)

#: The audit trail's user name for what the retention policy does.
AUDIT_USER = "system:retention"
#: Statuses in which no stage of the pipeline will read the instances again.
FINISHED = (StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_ROUTED)
_BATCH = 200


@dataclass(frozen=True, slots=True)
class PurgedStudy:
    study_instance_uid: str
    #: Instances whose files are gone (deleted now, or already missing), and their size.
    instances: int
    bytes: int
    #: Files that were already gone (deleted by hand, or a purge interrupted earlier).
    missing_files: int = 0
    #: Files that could not be deleted: still on disk, not marked purged, tried again.
    failed_files: int = 0


@dataclass(slots=True)
class PurgeReport:
    dry_run: bool
    instances_cutoff: datetime | None
    quarantine_cutoff: datetime | None
    studies: list[PurgedStudy] = field(default_factory=list)
    quarantine_files: int = 0
    quarantine_bytes: int = 0
    #: Quarantined files that could not be deleted (the next run tries again).
    quarantine_failed: int = 0

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def failed_files(self) -> int:
        """Files still on disk that the policy says are due: the purge is incomplete."""
        return sum(s.failed_files for s in self.studies) + self.quarantine_failed

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies) + self.quarantine_bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "instances_cutoff": _iso(self.instances_cutoff),
            "quarantine_cutoff": _iso(self.quarantine_cutoff),
            "studies": [asdict(s) for s in self.studies],
            "instances": self.instances,
            "quarantine_files": self.quarantine_files,
            "quarantine_bytes": self.quarantine_bytes,
            "quarantine_failed": self.quarantine_failed,
            "bytes": self.bytes,
            "failed_files": self.failed_files,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class Retention:
    """The purge itself; :class:`RetentionMonitor` runs it periodically, the CLI on demand."""

    def __init__(
        self,
        settings: RetentionSettings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.audit = AuditTrail(sessions)

    @property
    def enabled(self) -> bool:
        return self.settings.instances_days > 0 or self.settings.quarantine_days > 0

    def run(
        self,
        *,
        dry_run: bool = False,
        now: datetime | None = None,
        progress: Callable[[PurgedStudy], None] | None = None,
    ) -> PurgeReport:
        """Purge (or with ``dry_run`` only list) what the policy says is due at ``now``.

        ``progress`` is called after each study (the CLI shows how far it got).
        """
        now = now or utcnow()
        days = self.settings.instances_days
        qdays = self.settings.quarantine_days
        report = PurgeReport(
            dry_run=dry_run,
            instances_cutoff=now - timedelta(days=days) if days > 0 else None,
            quarantine_cutoff=now - timedelta(days=qdays) if qdays > 0 else None,
        )
        if report.instances_cutoff is not None:
            self._purge_studies(report, report.instances_cutoff, now, dry_run, progress)
        if report.quarantine_cutoff is not None:
            self._purge_quarantine(report, report.quarantine_cutoff, now, dry_run)
        return report

    # -- studies -----------------------------------------------------------------------
    def _candidates(self, session: Session, cutoff: datetime, limit: int | None) -> list[int]:
        unpurged = exists().where(Instance.study_id == Study.id, Instance.purged_at.is_(None))
        pending = exists().where(Export.study_id == Study.id, Export.state == ExportState.PENDING)
        stmt = (
            select(Study.id)
            .where(
                Study.status.in_(FINISHED),
                Study.last_received_at < cutoff,
                unpurged,
                ~pending,
            )
            .order_by(Study.last_received_at, Study.id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return list(session.scalars(stmt))

    def _purge_studies(
        self,
        report: PurgeReport,
        cutoff: datetime,
        now: datetime,
        dry_run: bool,
        progress: Callable[[PurgedStudy], None] | None,
    ) -> None:
        if dry_run:
            with self.sessions() as session:
                for study_id in self._candidates(session, cutoff, None):
                    uid, files = _unpurged_files(session, study_id)
                    listed = PurgedStudy(uid, len(files), sum(size for _, _, size in files))
                    report.studies.append(listed)
                    if progress is not None:
                        progress(listed)
            return
        skipped: set[int] = set()
        while True:
            with self.sessions() as session:
                batch = [i for i in self._candidates(session, cutoff, _BATCH) if i not in skipped]
            if not batch:
                return
            for study_id in batch:
                purged = self._purge_study(study_id, cutoff, now)
                # Files that failed are unpurged again: not once more in this run.
                if purged is None or purged.failed_files:
                    skipped.add(study_id)
                if purged is not None:
                    report.studies.append(purged)
                    if progress is not None:
                        progress(purged)

    def _purge_study(self, study_id: int, cutoff: datetime, now: datetime) -> PurgedStudy | None:
        """Mark the study's files purged (rows locked, conditions checked again), then delete.

        Marking first and deleting after the commit means an instance that arrives in
        the meantime re-opens the study in its own transaction and is never touched;
        a crash between the two leaves files behind, never rows pointing at nothing.
        Files that could not be deleted lose the mark again (:meth:`_unmark`).
        """
        with self.sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
            pending = session.scalar(
                select(Export.id)
                .where(Export.study_id == study_id, Export.state == ExportState.PENDING)
                .limit(1)
            )
            if (
                study is None
                or study.status not in FINISHED
                or study.last_received_at >= cutoff
                or pending is not None
            ):
                return None
            uid, files = _unpurged_files(session, study_id)
            session.execute(
                update(Instance)
                .where(Instance.id.in_([i for i, _, _ in files]))
                .values(purged_at=now)
            )
            study.purged_at = now
        missing = 0
        gone: list[tuple[int, str, int]] = []
        failed: list[tuple[int, str, int]] = []
        directories: set[Path] = set()
        for file in files:
            path = self.store.path(file[1])
            directories.add(path.parent)
            try:
                path.unlink()
            except FileNotFoundError:
                missing += 1
            except OSError as exc:
                log.error("retention: cannot delete a file of study=%s: %s", uid, exc.strerror)
                failed.append(file)
                continue
            gone.append(file)
        _remove_empty(directories, self.store.instances_dir)
        if failed:
            self._unmark(study_id, failed)
        purged = PurgedStudy(uid, len(gone), sum(size for _, _, size in gone), missing, len(failed))
        log.info(
            "retention: purged study=%s instances=%d bytes=%d failed_files=%d",
            uid,
            purged.instances,
            purged.bytes,
            purged.failed_files,
        )
        if gone:
            self.audit.record(
                AUDIT_USER,
                "retention.purge",
                study_instance_uid=uid,
                detail=(
                    f"instances={purged.instances} bytes={purged.bytes} "
                    f"missing_files={missing} failed_files={len(failed)} "
                    f"older_than={self.settings.instances_days}d"
                ),
            )
        return purged

    def _unmark(self, study_id: int, failed: list[tuple[int, str, int]]) -> None:
        """Clear the purge mark of files still on disk, so that the next run retries them.

        Only rows still pointing at that file (an instance restored meanwhile has a new
        one). The study row is locked first, in the order ingest takes them, and keeps
        its ``purged_at`` while any other instance of it stays purged.
        """
        with self.sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
            for instance_id, rel, _ in failed:
                session.execute(
                    update(Instance)
                    .where(
                        Instance.id == instance_id,
                        Instance.path == rel,
                        Instance.purged_at.is_not(None),
                    )
                    .values(purged_at=None)
                )
            still_purged = session.scalar(
                select(Instance.id)
                .where(Instance.study_id == study_id, Instance.purged_at.is_not(None))
                .limit(1)
            )
            if study is not None and still_purged is None:
                study.purged_at = None

    # -- quarantine --------------------------------------------------------------------
    def _purge_quarantine(
        self, report: PurgeReport, cutoff: datetime, now: datetime, dry_run: bool
    ) -> None:
        with self.sessions.begin() as session:
            rows = session.execute(
                select(QuarantinedInstance.id, QuarantinedInstance.path)
                .where(QuarantinedInstance.received_at < cutoff)
                .where(QuarantinedInstance.purged_at.is_(None))
            ).all()
            if rows and not dry_run:
                session.execute(
                    update(QuarantinedInstance)
                    .where(QuarantinedInstance.id.in_([r.id for r in rows]))
                    .values(purged_at=now)
                )
        # Files go by age on disk, recorded or not: a refusal whose database row could
        # not be written (0xA701) still left its bytes and sidecar here.
        oldest = cutoff.timestamp()
        recorded = {self.store.path(r.path).name: r.id for r in rows}
        files = 0
        size = 0
        kept: list[int] = []
        for path in sorted(self.store.quarantine_dir.iterdir()):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if not path.is_file() or (stat.st_mtime >= oldest and path.name not in recorded):
                continue
            if not dry_run:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.error("retention: cannot delete a quarantined file: %s", exc.strerror)
                    if path.suffix == ".dcm":
                        report.quarantine_failed += 1
                        if path.name in recorded:
                            kept.append(recorded[path.name])
                    continue
                if path.suffix == ".dcm":
                    # The sidecar is listed too: a failure here is reported there.
                    with contextlib.suppress(OSError):
                        path.with_suffix(".json").unlink(missing_ok=True)
            if path.suffix == ".dcm":
                files += 1
                size += stat.st_size
        if kept:
            # Still on disk: not purged (the file's age brings it back next run).
            with self.sessions.begin() as session:
                session.execute(
                    update(QuarantinedInstance)
                    .where(QuarantinedInstance.id.in_(kept))
                    .values(purged_at=None)
                )
        report.quarantine_files = files
        report.quarantine_bytes = size
        if files and not dry_run:
            log.info("retention: purged quarantined files=%d bytes=%d", files, size)
            self.audit.record(
                AUDIT_USER,
                "retention.quarantine",
                detail=(
                    f"files={files} bytes={size} records={len(rows) - len(kept)} "
                    f"failed_files={report.quarantine_failed} "
                    f"older_than={self.settings.quarantine_days}d"
                ),
            )


def _unpurged_files(session: Session, study_id: int) -> tuple[str, list[tuple[int, str, int]]]:
    uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id)) or ""
    rows = session.execute(
        select(Instance.id, Instance.path, Instance.size_bytes).where(
            Instance.study_id == study_id, Instance.purged_at.is_(None)
        )
    ).all()
    return uid, [(r.id, r.path, r.size_bytes) for r in rows]


def _remove_empty(directories: set[Path], root: Path) -> None:
    """Remove series and study folders left empty (never ``root`` itself)."""
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        d = directory
        while d != root and root in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


class RetentionMonitor:
    """Background thread running the purge every ``check_interval_minutes``."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self.interval = retention.settings.check_interval_minutes * 60.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> PurgeReport | None:
        try:
            return self.retention.run()
        except SQLAlchemyError as exc:
            log.error("retention run failed error=%s; retrying later", type(exc).__name__)
        except Exception:
            log.exception("retention run failed; retrying later")
        return None

    def _loop(self) -> None:
        # The first run soon after start (not at once: let the node come up first).
        delay = min(self.interval, 5.0)
        while not self._stop.wait(delay):
            started = time.monotonic()
            self.run_once()
            delay = max(self.interval - (time.monotonic() - started), 1.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
