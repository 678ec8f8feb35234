"""The numbers a PACS administrator looks at: throughput, turnaround, failures, backlog.

No patient data: counts, durations, UIDs and reasons only.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import Export, ExportState, Study, StudyStatus
from node.db.types import utcnow

WINDOW = timedelta(hours=24)


class RecentError(BaseModel):
    time: datetime | None
    what: str
    study_instance_uid: str | None
    reason: str | None


class WorkerHealth(BaseModel):
    #: Worker processes this node started (0 when workers run elsewhere).
    processes: int
    alive: int
    #: Studies being processed, and those whose worker lease has run out.
    processing: int
    stale_leases: int


class Dashboard(BaseModel):
    generated_at: datetime
    #: Studies received in the last hour, and per hour over the last 24 hours (oldest first).
    studies_last_hour: int
    studies_per_hour: list[int]
    #: Median seconds from the first instance received to results stored (last 24 hours).
    median_seconds_to_result: float | None
    results_last_24h: int
    failed_last_24h: int
    failed_total: int
    pending_exports: int
    failed_exports: int
    #: Studies per status (queue depths).
    by_status: dict[str, int]
    disk_free_bytes: int
    workers: WorkerHealth
    recent_errors: list[RecentError]


def dashboard(session: Session, *, disk_free_bytes: int, processes: int, alive: int) -> Dashboard:
    now = utcnow()
    since = now - WINDOW
    received = session.scalars(
        select(Study.first_received_at).where(Study.first_received_at >= since)
    ).all()
    per_hour = [0] * 24
    for t in received:
        # A sender's clock ahead of ours puts a study in the future: count it as now.
        hours_ago = max(0, int((now - t).total_seconds() // 3600))
        per_hour[23 - min(23, hours_ago)] += 1
    turnaround = [
        (finished - first).total_seconds()
        for first, finished in session.execute(
            select(Study.first_received_at, Study.finished_at).where(
                Study.status == StudyStatus.DONE, Study.finished_at >= since
            )
        )
        if finished is not None
    ]
    by_status = {
        str(status): int(count)
        for status, count in session.execute(
            select(Study.status, func.count()).group_by(Study.status)
        )
    }
    exports = {
        str(state): int(count)
        for state, count in session.execute(
            select(Export.state, func.count()).group_by(Export.state)
        )
    }
    failed_recent = int(
        session.scalar(
            select(func.count()).where(
                Study.status == StudyStatus.FAILED, Study.last_received_at >= since
            )
        )
        or 0
    )
    stale = int(
        session.scalar(
            select(func.count()).where(
                Study.status == StudyStatus.PROCESSING, Study.lease_until < now
            )
        )
        or 0
    )
    errors = [
        RecentError(time=t, what="study failed", study_instance_uid=uid, reason=reason)
        for t, uid, reason in session.execute(
            select(Study.finished_at, Study.study_instance_uid, Study.status_reason)
            .where(Study.status == StudyStatus.FAILED)
            .order_by(Study.last_received_at.desc())
            .limit(10)
        )
    ]
    errors += [
        RecentError(
            time=t,
            what=f"delivery to {destination} failed",
            study_instance_uid=None,
            reason=reason,
        )
        for t, destination, reason in session.execute(
            select(Export.next_attempt_at, Export.destination, Export.last_error)
            .where(Export.state == ExportState.FAILED)
            .order_by(Export.id.desc())
            .limit(10)
        )
    ]
    return Dashboard(
        generated_at=now,
        studies_last_hour=per_hour[-1],
        studies_per_hour=per_hour,
        median_seconds_to_result=statistics.median(turnaround) if turnaround else None,
        results_last_24h=len(turnaround),
        failed_last_24h=failed_recent,
        failed_total=by_status.get(StudyStatus.FAILED, 0),
        pending_exports=exports.get(ExportState.PENDING, 0),
        failed_exports=exports.get(ExportState.FAILED, 0),
        by_status=by_status,
        disk_free_bytes=disk_free_bytes,
        workers=WorkerHealth(
            processes=processes,
            alive=alive,
            processing=by_status.get(StudyStatus.PROCESSING, 0),
            stale_leases=stale,
        ),
        recent_errors=errors,
    )
