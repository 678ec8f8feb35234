"""From a complete study to a queued task: routing, sending by urgency, and recovery.

The database is the record and the broker only delivers. A supervisor loop in
the node process makes the two agree, whatever was lost in between:

* ``complete`` studies are routed: to ``queued`` (with the rule's models,
  destinations and base priority) or to ``not_routed`` (visible, never dropped);
* ``queued`` studies without a sent message (new, retry delay over, or a
  message the broker lost: older than the lease, its queue empty) are sent to
  the queue of their priority;
* ``processing`` studies whose lease expired (the worker died) are queued
  again, or failed after ``pipeline.max_attempts``.

Sending is idempotent on the worker side (it claims the study in the database),
so a message sent twice costs a no-op, never a second result.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import CompletedStudy
from node.config import PipelineSettings, Settings
from node.db.models import Export, ExportState, Instance, Priority, Study, StudyStatus
from node.db.types import utcnow
from node.errors import NodeError, StudyPurged
from node.export import deliveries
from node.observability.metrics import queue_depths
from node.routing.attributes import study_series_attributes
from node.routing.match import route
from node.routing.store import RuleStore
from node.storage import InstanceStore

log = logging.getLogger(__name__)


def escalated(priority: int, key_score: float | None, settings: PipelineSettings) -> int:
    """``priority``, raised to ``pipeline.escalate_to`` if the key score reaches the threshold.

    What a study version's findings earn it: the worker sets it when they are recorded,
    routing keeps it while they are the ones shown (the study re-opened or reprocessed).
    """
    if key_score is not None and key_score >= settings.escalate_threshold:
        return max(priority, Priority[settings.escalate_to.upper()])
    return priority


def worker_lost(
    study: Study, max_attempts: int, now: datetime, *, message_given_back: bool = False
) -> None:
    """The run holding ``study`` is gone: queue it again, or fail it after ``max_attempts``.

    ``message_given_back``: its message is back in the broker (Celery requeues the
    message of a pool process it lost), so the study counts as sent and the
    supervisor sends no second one; otherwise it sends one.
    """
    if study.attempts >= max_attempts:
        study.status = StudyStatus.FAILED
        study.status_reason = f"worker lost during {study.attempts} attempts"
        study.finished_at = now
    else:
        study.status = StudyStatus.QUEUED
        study.status_reason = f"worker lost during attempt {study.attempts}; queued again"
        study.queued_at = now if message_given_back else None
    study.lease_owner = None
    study.lease_until = None


class Pipeline:
    """Routes complete studies and keeps the queue in step with the database."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        rules: RuleStore,
        celery: Any,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.rules = rules
        self.celery = celery
        self._lock = threading.Lock()
        #: study id -> the last routing failure logged for it (log each reason once).
        self._routing_failures: dict[int, str] = {}

    # -- routing -----------------------------------------------------------------------
    def route_study(self, study_id: int, version: int) -> StudyStatus | None:
        """Apply the active rules to a complete study; returns its new status."""
        rule_version, rule_set = self.rules.active()
        with self.sessions() as session:
            attributes = study_series_attributes(session, self.store, study_id)
        decision = route(rule_set, attributes)
        with self.sessions.begin() as session:
            guard = (
                Study.id == study_id,
                Study.version == version,
                Study.status == StudyStatus.COMPLETE,
            )
            if decision is None:
                values: dict[str, Any] = {
                    "status": StudyStatus.NOT_ROUTED,
                    "status_reason": f"no rule of rules version {rule_version} matched",
                    "rule_set_version": rule_version,
                    "routing_rule": None,
                }
                status = StudyStatus.NOT_ROUTED
            else:
                # A re-opened (or reprocessed) study still shows its previous findings:
                # it keeps the urgency they earned until the new version's replace them.
                score = session.scalar(select(Study.key_score).where(*guard))
                values = {
                    "status": StudyStatus.QUEUED,
                    "status_reason": None,
                    "rule_set_version": rule_version,
                    "routing_rule": decision.rule_name,
                    "routing_models": list(decision.models),
                    "routing_destinations": list(decision.destinations),
                    "routing_series": list(decision.series_instance_uids),
                    "base_priority": int(decision.priority),
                    "priority": escalated(int(decision.priority), score, self.settings.pipeline),
                    "queued_at": None,
                    "lease_owner": None,
                    "lease_until": None,
                    "attempts": 0,
                }
                status = StudyStatus.QUEUED
            changed = session.execute(
                update(Study).where(*guard).values(**values).returning(Study.study_instance_uid)
            ).first()
            if changed is not None and decision is not None:
                # One transaction: if the originals cannot be queued, the study stays
                # complete and routing is retried whole, never queued without them.
                self._forward_originals(session, study_id, version, decision.destinations)
        if changed is None:
            return None  # re-opened or routed meanwhile
        log.info(
            "study routed study_uid=%s version=%d rule=%s status=%s",
            changed.study_instance_uid,
            version,
            decision.rule_name if decision else "-",
            status.value,
        )
        return status

    def _forward_originals(
        self, session: Session, study_id: int, version: int, destinations: Sequence[str]
    ) -> None:
        """Queue the study's own instances for destinations that want the originals too.

        A re-opened (or reprocessed) study is routed again: each destination then gets
        only the originals it lacks. One already delivered or still waiting is not queued
        again (a PACS wants no duplicates, and re-arming would restart its retries), nor
        one the destination refused for good (:func:`deliveries.refused_for_good`); one
        that failed otherwise is, with the new version. Instances purged by retention
        have no file.
        """
        wanted = [
            d for d in destinations if (dest := self.settings.destination(d)) and dest.send_original
        ]
        if not wanted:
            return
        instances = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path).where(
                Instance.study_id == study_id, Instance.purged_at.is_(None)
            )
        ).all()
        queued = {
            (row.destination, row.sop_instance_uid)
            for row in session.execute(
                select(
                    Export.destination,
                    Export.sop_instance_uid,
                    Export.state,
                    Export.last_status,
                    Export.last_error,
                ).where(Export.study_id == study_id, Export.kind == "original")
            )
            if row.state != ExportState.FAILED
            or deliveries.refused_for_good(row.state, row.last_status, row.last_error)
        }
        for name in wanted:
            for inst in instances:
                if (name, inst.sop_instance_uid) in queued:
                    continue
                deliveries.enqueue(
                    session,
                    study_id=study_id,
                    study_version=version,
                    destination=name,
                    kind="original",
                    sop_instance_uid=inst.sop_instance_uid,
                    sop_class_uid=inst.sop_class_uid,
                    path=inst.path,
                )

    def route_or_note(self, study_id: int, version: int, study_uid: str) -> StudyStatus | None:
        """:meth:`route_study`, never raising: a failure is kept on the study and retried.

        The study stays ``complete`` with the reason in ``status_reason`` (shown to
        admins) and the supervisor tries again on its next tick. Each new reason is
        logged once, not every tick. One study that cannot be routed (its rules
        version no longer validates, its files cannot be read) must not stop the
        others, nor recovery and dispatch.
        """
        try:
            status = self.route_study(study_id, version)
        except Exception as exc:
            # A NodeError's message is written for operators; any other message may
            # quote data (SQL parameters, element values), so only its type is shown.
            reason = str(exc) if isinstance(exc, NodeError) else type(exc).__name__
            if self._routing_failures.get(study_id) != reason:
                self._routing_failures[study_id] = reason
                log.error("routing failed study_uid=%s: %s; retrying", study_uid, reason)
                log.debug("routing failure study_uid=%s", study_uid, exc_info=True)
                self._note_routing_failure(study_id, version, reason)
            return None
        self._routing_failures.pop(study_id, None)
        return status

    def _note_routing_failure(self, study_id: int, version: int, reason: str) -> None:
        with contextlib.suppress(SQLAlchemyError), self.sessions.begin() as session:
            session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.version == version,
                    Study.status == StudyStatus.COMPLETE,
                )
                .values(status_reason=f"routing failed, retrying: {reason}"[:2000])
            )

    def on_complete(self, done: Sequence[CompletedStudy]) -> None:
        """Completion hook: route at once instead of waiting for the next tick."""
        for study in done:
            self.route_or_note(study.study_id, study.version, study.study_instance_uid)
        self.dispatch_due()

    def reprocess(self, study_instance_uid: str) -> StudyStatus | None:
        """Run a finished study through routing and the models again (same version).

        Result objects get the same UIDs as before, so destinations receive
        replacements, not duplicates. Returns the status routing gave it (``complete``
        if routing failed and will be retried, see :meth:`route_or_note`); None if the
        study is unknown or still busy. A study whose images retention purged raises
        :class:`StudyPurged`: there is nothing left to analyse.
        """
        with self.sessions.begin() as session:
            row = session.execute(
                update(Study)
                .where(
                    Study.study_instance_uid == study_instance_uid,
                    Study.status.in_(
                        [StudyStatus.DONE, StudyStatus.FAILED, StudyStatus.NOT_ROUTED]
                    ),
                    Study.purged_at.is_(None),
                )
                .values(status=StudyStatus.COMPLETE, status_reason="reprocessing requested")
                .returning(Study.id, Study.version)
            ).first()
            if row is None:
                purged = session.scalar(
                    select(Study.purged_at).where(Study.study_instance_uid == study_instance_uid)
                )
                if purged is not None:
                    # A study's purged_at stays until every image is back: some may be.
                    kept = session.scalar(
                        select(Instance.id)
                        .join(Study, Study.id == Instance.study_id)
                        .where(
                            Study.study_instance_uid == study_instance_uid,
                            Instance.purged_at.is_(None),
                        )
                        .limit(1)
                    )
                    which = "its images" if kept is None else "some of its images"
                    raise StudyPurged(
                        study_instance_uid,
                        f"{which} were purged by retention at {purged.isoformat()}; "
                        "send the whole study again to analyse it",
                    )
                return None
        status = self.route_or_note(row.id, row.version, study_instance_uid)
        self.dispatch_due()
        if status is None:
            # Routing failed (kept complete), or the supervisor's tick routed the study
            # between the two transactions: report where it is, not where it was.
            with self.sessions() as session:
                status = session.scalar(select(Study.status).where(Study.id == row.id))
        return status or StudyStatus.COMPLETE

    # -- sending -----------------------------------------------------------------------
    def dispatch_due(self) -> int:
        """Send every queued study that has no message in flight; returns how many."""
        from workers.celery_app import PROCESS_STUDY, queue_for

        now = utcnow()
        with self._lock:
            with self.sessions() as session:
                due = session.execute(
                    select(Study.id, Study.version, Study.priority, Study.study_instance_uid)
                    .where(
                        Study.status == StudyStatus.QUEUED,
                        Study.queued_at.is_(None),
                        or_(Study.lease_until.is_(None), Study.lease_until <= now),
                    )
                    .order_by(Study.priority.desc(), Study.completed_at)
                ).all()
            sent = 0
            for row in due:
                # Record the send first (so a fast worker's claim can never hide it), and
                # take it back if the broker refuses the message.
                stamp = utcnow()
                with self.sessions.begin() as session:
                    claimed = session.execute(
                        update(Study)
                        .where(
                            Study.id == row.id,
                            Study.version == row.version,
                            Study.status == StudyStatus.QUEUED,
                            Study.queued_at.is_(None),
                        )
                        .values(queued_at=stamp, lease_until=None)
                        .returning(Study.id)
                    ).first()
                if claimed is None:
                    continue
                try:
                    self.celery.send_task(
                        PROCESS_STUDY, args=[row.id, row.version], queue=queue_for(row.priority)
                    )
                except Exception as exc:
                    log.error(
                        "cannot queue study_uid=%s error=%s; will retry",
                        row.study_instance_uid,
                        exc,
                    )
                    with self.sessions.begin() as session:
                        session.execute(
                            update(Study)
                            .where(Study.id == row.id, Study.queued_at == stamp)
                            .values(queued_at=None)
                        )
                    break
                sent += 1
                log.info(
                    "study queued study_uid=%s queue=%s",
                    row.study_instance_uid,
                    queue_for(row.priority),
                )
            return sent

    # -- recovery ----------------------------------------------------------------------
    def recover(self) -> None:
        """Hand out again what a dead worker held, or a message that seems lost."""
        now = utcnow()
        lease = timedelta(seconds=self.settings.pipeline.lease_seconds)
        max_attempts = self.settings.pipeline.max_attempts
        with self.sessions.begin() as session:
            expired = (
                session.execute(
                    select(Study)
                    .where(Study.status == StudyStatus.PROCESSING, Study.lease_until < now)
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            for study in expired:
                worker_lost(study, max_attempts, now)
                log.warning(
                    "lease expired study_uid=%s -> %s", study.study_instance_uid, study.status
                )
        self._resend_lost(now - lease)

    def _resend_lost(self, sent_before: datetime) -> None:
        """Send again the queued studies whose message the broker lost.

        A message sent more than a lease ago and not claimed is lost, or still
        waiting behind a long backlog. Only the first must be sent again (a second
        message per lease behind every waiting one is what a backlog least needs), and
        the broker says which: its queues are first in, first out, so while the
        study's queue holds messages its own may be among them; once the queue is
        empty it is not. A message lost from a queue that still holds others is
        re-sent once that queue drains. A broker that cannot count its queues gets
        every such study re-sent, as before: a duplicate message costs a no-op claim.
        """
        from workers.celery_app import queue_for

        with self.sessions() as session:
            stale = session.execute(
                select(Study.id, Study.priority).where(
                    Study.status == StudyStatus.QUEUED, Study.queued_at < sent_before
                )
            ).all()
        if not stale:
            return
        queues = {queue_for(row.priority) for row in stale}
        try:
            empty = {name for name, n in queue_depths(self.celery, queues).items() if n == 0}
        except Exception as exc:
            log.warning("cannot count the broker's queues error=%s", type(exc).__name__)
            empty = queues
        lost = [row.id for row in stale if queue_for(row.priority) in empty]
        if not lost:
            return
        with self.sessions.begin() as session:
            session.execute(
                update(Study)
                .where(
                    Study.id.in_(lost),
                    Study.status == StudyStatus.QUEUED,
                    Study.queued_at < sent_before,
                )
                .values(queued_at=None)
            )

    def tick(self) -> None:
        """One supervisor round; each step runs even if an earlier one failed."""
        try:
            with self.sessions() as session:
                complete = session.execute(
                    select(Study.id, Study.version, Study.study_instance_uid).where(
                        Study.status == StudyStatus.COMPLETE
                    )
                ).all()
            for row in complete:
                self.route_or_note(row.id, row.version, row.study_instance_uid)
            waiting = {row.id for row in complete}
            for study_id in list(self._routing_failures):
                if study_id not in waiting:
                    del self._routing_failures[study_id]  # routed, re-opened or reprocessed
        finally:
            try:
                self.recover()
            finally:
                self.dispatch_due()


class PipelineSupervisor:
    """Runs :meth:`Pipeline.tick` in the background of the node process."""

    def __init__(self, pipeline: Pipeline, interval_seconds: float = 1.0) -> None:
        self.pipeline = pipeline
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.pipeline.tick()
            except Exception:
                log.exception("pipeline supervisor tick failed; retrying")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pipeline", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


__all__ = ["Pipeline", "PipelineSupervisor", "Priority", "escalated", "worker_lost"]
