"""The export queue in the database: what must go where, and how each attempt went."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.db.dialects import insert_for
from node.db.models import Export, ExportState, Study
from node.db.types import utcnow
from node.export.scu import NOT_ACCEPTED, PROCESSING_FAILURE, Delivery, Outcome, classify

#: export.max_processing_failures when the caller does not say (config.ExportSettings).
MAX_PROCESSING_FAILURES = 5
_STREAK = re.compile(r"\(processing failure\) (\d+) of \d+ in a row")


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: int
    study_instance_uid: str
    destination: str
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "StudyInstanceUID": self.study_instance_uid,
            "destination": self.destination,
            "kind": self.kind,
            "SOPInstanceUID": self.sop_instance_uid,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": None if self.last_status is None else f"0x{self.last_status:04X}",
            "last_error": self.last_error,
            "created": self.created_at.isoformat(),
            "next_attempt": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "delivered": self.delivered_at.isoformat() if self.delivered_at else None,
        }


def enqueue(
    session: Session,
    *,
    study_id: int,
    study_version: int,
    destination: str,
    kind: str,
    sop_instance_uid: str,
    sop_class_uid: str,
    path: str,
) -> None:
    """Add (or re-arm, for a re-processed object with the same UID) one delivery."""
    now = utcnow()
    values = {
        "study_id": study_id,
        "study_version": study_version,
        "destination": destination,
        "kind": kind,
        "sop_instance_uid": sop_instance_uid,
        "sop_class_uid": sop_class_uid,
        "path": path,
        "state": ExportState.PENDING,
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "created_at": now,
        "retry_started_at": now,
        "next_attempt_at": now,
        "delivered_at": None,
    }
    stmt = insert_for(session, Export).values(**values)
    rearm = {
        k: stmt.excluded[k]
        for k in values
        if k not in ("destination", "sop_instance_uid", "created_at")
    }
    session.execute(
        stmt.on_conflict_do_update(index_elements=["destination", "sop_instance_uid"], set_=rearm)
    )


def refused_for_good(state: str, last_status: int | None, last_error: str | None) -> bool:
    """Whether the destination itself refused the object for good.

    A failure status (PS3.4 B.2.3; not 0xA7xx, 0x0110 or 0x0213, which are retried) or
    a SOP class it does not accept: the same bytes would be refused again, so a new
    version of the study does not send them again (an admin can re-arm one). A
    delivery that failed here (no file, de-identification) or gave up retrying is not.
    """
    if state != ExportState.FAILED:
        return False
    if last_status is not None:
        return classify(last_status) is Outcome.PERMANENT
    return (last_error or "").startswith(NOT_ACCEPTED)


def due(session: Session, now: datetime, limit: int = 100) -> list[Export]:
    """Pending deliveries whose next attempt is due, most urgent study first."""
    return list(
        session.execute(
            select(Export)
            .join(Study, Study.id == Export.study_id)
            .where(Export.state == ExportState.PENDING, Export.next_attempt_at <= now)
            .order_by(Study.priority.desc(), Export.created_at, Export.id)
            .limit(limit)
        ).scalars()
    )


def claim(session: Session, ids: list[int], *, now: datetime, until: datetime) -> list[Export]:
    """Claim the deliveries ``ids`` still due at ``now`` for one attempt, until ``until``.

    One statement, so two exporters claiming the same row cannot both get it: the
    second waits for the first's row lock (PostgreSQL) or write lock (SQLite), then
    finds it no longer due. The attempt's outcome (:func:`record`) sets the next
    attempt; a claim left by a process that died lapses at ``until``.
    """
    return list(
        session.execute(
            update(Export)
            .where(
                Export.id.in_(ids),
                Export.state == ExportState.PENDING,
                Export.next_attempt_at <= now,
            )
            .values(next_attempt_at=until)
            .returning(Export)
        ).scalars()
    )


def extend_claim(session: Session, ids: list[int], *, held: datetime, until: datetime) -> None:
    """Keep a claim (:func:`claim`, held until ``held``) ahead of a long attempt.

    A row re-armed meanwhile (due now, not at ``held``) is left as it is.
    """
    session.execute(
        update(Export)
        .where(
            Export.id.in_(ids),
            Export.state == ExportState.PENDING,
            Export.next_attempt_at == held,
        )
        .values(next_attempt_at=until)
    )


def still_as_sent(current: Export, sent: Export) -> bool:
    """Whether the row still describes the object an attempt sent.

    The exporter sends from a detached copy of the row. Meanwhile the pipeline
    may re-arm it with a re-processed object (:func:`enqueue`: new path and
    version) or an admin may re-arm it (:func:`retry`); both restart
    ``retry_started_at``. Such an attempt's outcome belongs to the old object
    and must not be recorded over the new one, which is still to be sent.
    """
    return (
        current.state == ExportState.PENDING
        and current.path == sent.path
        and current.study_version == sent.study_version
        and current.retry_started_at == sent.retry_started_at
    )


def record(
    session: Session,
    export: Export,
    delivery: Delivery,
    *,
    retry_for: timedelta,
    initial_backoff: float,
    max_backoff: float,
    max_processing_failures: int = MAX_PROCESSING_FAILURES,
) -> None:
    """Store the outcome of one attempt and decide the next one.

    A temporary failure is retried with exponential backoff within ``retry_for``.
    Status 0x0110 (processing failure) is retried too, but after
    ``max_processing_failures`` answers 0x0110 in a row the delivery fails for good:
    a PACS that keeps failing to process the object will not take it on the next try
    either, and an admin can still re-arm it (``triage-node exports retry``).
    """
    now = utcnow()
    if delivery.outcome is Outcome.UNSENT:
        # Not attempted: due again now (the claim released), nothing counted.
        export.next_attempt_at = now
        return
    streak = _processing_failures(export) + 1 if delivery.status == PROCESSING_FAILURE else 0
    export.attempts += 1
    export.last_status = delivery.status
    if delivery.outcome is Outcome.DELIVERED:
        export.state = ExportState.DELIVERED
        export.delivered_at = now
        export.next_attempt_at = None
        # A Warning (0xB000 coercion, 0xB006 elements discarded, 0xB007 not matching
        # the SOP class) is stored all the same, but an admin wants to know what changed.
        export.last_error = delivery.as_recorded[:2000] if delivery.status else None
        return
    export.last_error = delivery.as_recorded[:2000]
    if delivery.outcome is Outcome.PERMANENT:
        export.state = ExportState.FAILED
        export.next_attempt_at = None
        return
    if streak >= max_processing_failures:
        export.state = ExportState.FAILED
        gave_up = f"gave up after {streak} answers 0x{PROCESSING_FAILURE:04X} in a row"
        export.last_error = f"{gave_up}: {delivery.as_recorded}"[:2000]
        export.next_attempt_at = None
        return
    if streak:
        # The count of answers 0x0110 in a row lives in the delivery's visible record
        # (last_error, shown by `triage-node exports` and the web pages): the exports
        # table has no column for it, and the previous answer is all the count needs.
        export.last_error = (
            f"{delivery.detail} {streak} of {max_processing_failures} in a row; retrying"
            + delivery.as_recorded.removeprefix(delivery.detail)
        )[:2000]
    if now - export.retry_started_at >= retry_for:
        export.state = ExportState.FAILED
        export.last_error = f"gave up after {export.attempts} attempts: {delivery.as_recorded}"[
            :2000
        ]
        export.next_attempt_at = None
        return
    # The exponent is capped: 2 ** 1024 overflows a float, and a destination retried
    # that often (a day at a 60 s cap) stalled the exporter's whole batch.
    delay = min(max_backoff, initial_backoff * 2 ** min(export.attempts - 1, 60))
    export.next_attempt_at = now + timedelta(seconds=delay)


def _processing_failures(export: Export) -> int:
    """Answers 0x0110 in a row up to the previous attempt (0 when it answered otherwise)."""
    if export.last_status != PROCESSING_FAILURE or export.attempts == 0:
        return 0
    found = _STREAK.search(export.last_error or "")
    return int(found.group(1)) if found else 1


def retry(session: Session, export_id: int) -> bool:
    """Re-arm one delivery now (after an admin fixed the cause); False if unknown.

    A delivered one is sent again (the PACS lost it, say): pending, it no longer shows
    a delivery time until the new send.
    """
    now = utcnow()
    changed = session.execute(
        update(Export)
        .where(Export.id == export_id)
        .values(
            state=ExportState.PENDING,
            next_attempt_at=now,
            retry_started_at=now,
            attempts=0,
            delivered_at=None,
        )
        .returning(Export.id)
    ).first()
    return changed is not None


def list_deliveries(
    session: Session, *, limit: int = 200, state: str | None = None
) -> list[DeliveryRow]:
    query = (
        select(Export, Study.study_instance_uid)
        .join(Study, Study.id == Export.study_id)
        .order_by(Export.id.desc())
        .limit(limit)
    )
    if state:
        query = query.where(Export.state == state)
    return [
        DeliveryRow(
            e.id,
            uid,
            e.destination,
            e.kind,
            e.sop_instance_uid,
            str(e.state),
            e.attempts,
            e.last_status,
            e.last_error,
            e.created_at,
            e.next_attempt_at,
            e.delivered_at,
        )
        for e, uid in session.execute(query).all()
    ]
