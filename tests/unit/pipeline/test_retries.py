"""Processing outcomes in the database: claim, transient retries with backoff, bounded attempts.

The model runner here raises on purpose: what is under test is the state machine
around it (lease, attempts, not-before times, the supervisor's re-queueing).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Study, StudyStatus
from node.db.types import utcnow
from node.pipeline import Pipeline
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.unit.pipeline.studies import queued_study
from workers.processing import StudyProcessor


class FailingRunner:
    """Stands where the models run; using them fails like a transient fault would."""

    @property
    def classifier(self) -> Any:
        raise RuntimeError("GPU out of memory")

    segmenter = classifier


class RecordingCelery:
    """Collects what the pipeline sends, instead of a broker, for this state-machine test."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[int], str]] = []

    def send_task(self, name: str, args: list[int], queue: str) -> None:
        self.sent.append((args, queue))


@pytest.fixture
def setup(tmp_path: Path, database_url: str) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    cfg = node_config(
        tmp_path, database_url, pipeline={"max_attempts": 3, "retry_backoff_seconds": 10}
    )
    settings = Settings.model_validate(cfg)
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield settings, make_sessionmaker(engine)
    engine.dispose()


def test_transient_failures_retry_with_backoff_then_fail(
    setup: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, sessions = setup
    study_id = queued_study(sessions, "1.2.826.0.1.3680043.10.1234.77", ["pneumonia-triage"])
    processor = StudyProcessor(settings, sessions, FailingRunner())  # type: ignore[arg-type]
    # No images: the runner is never reached, the study is done with a note.
    assert processor.run(study_id, 1).state == "done"

    with sessions.begin() as session:
        session.execute(
            update(Study).where(Study.id == study_id).values(status=StudyStatus.QUEUED, attempts=0)
        )
    processor._select_frames = lambda paths, models: ([object()], [])  # type: ignore[method-assign,assignment,list-item]
    delays = []
    for attempt in (1, 2):
        started = utcnow()
        outcome = processor.run(study_id, 1)
        finished = utcnow()
        assert outcome.state == "retry" and "GPU out of memory" in (outcome.reason or "")
        with sessions() as session:
            study = session.get(Study, study_id)
            assert study is not None and study.lease_until is not None
            assert study.status == StudyStatus.QUEUED and study.attempts == attempt
            assert study.queued_at is None and study.lease_owner is None
            # The not-before time is set during run(): bracket it, whatever the load.
            delays.append(
                (
                    (study.lease_until - finished).total_seconds(),
                    (study.lease_until - started).total_seconds(),
                )
            )
        # Before its not-before time, a (redelivered) message cannot claim the study.
        assert processor.run(study_id, 1).state == "skipped"
        with sessions.begin() as session:
            session.execute(
                update(Study)
                .where(Study.id == study_id)
                .values(lease_until=utcnow() - timedelta(seconds=1))
            )
    for (low, high), backoff in zip(delays, (10, 20), strict=True):  # 10 s, then doubled
        assert low <= backoff <= high, (low, backoff, high)

    outcome = processor.run(study_id, 1)
    assert outcome.state == "failed"
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.status == StudyStatus.FAILED and study.attempts == 3
        assert "GPU out of memory" in (study.status_reason or "")


def test_supervisor_resends_when_due_and_recovers_dead_workers(
    setup: tuple[Settings, sessionmaker[Session]], tmp_path: Path
) -> None:
    settings, sessions = setup
    study_id = queued_study(sessions, "1.2.826.0.1.3680043.10.1234.77", ["pneumonia-triage"])
    celery = RecordingCelery()
    pipeline = Pipeline(
        settings, sessions, InstanceStore(tmp_path / "var"), RuleStore(sessions), celery
    )
    now = utcnow()
    # A retry waiting for its not-before time is not sent yet...
    with sessions.begin() as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(queued_at=None, lease_until=now + timedelta(hours=1))
        )
    assert pipeline.dispatch_due() == 0
    # ...and is sent once due, to the queue of its priority.
    with sessions.begin() as session:
        session.execute(
            update(Study).where(Study.id == study_id).values(lease_until=now - timedelta(seconds=1))
        )
    assert pipeline.dispatch_due() == 1 and celery.sent == [([study_id, 1], "routine")]
    assert pipeline.dispatch_due() == 0  # in flight: not sent twice

    # A worker that died holding the study: its lease expires, the study is queued again.
    with sessions.begin() as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                status=StudyStatus.PROCESSING,
                lease_owner="dead",
                lease_until=now - timedelta(seconds=1),
                attempts=1,
            )
        )
    pipeline.recover()
    assert pipeline.dispatch_due() == 1
    with sessions() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.status == StudyStatus.QUEUED and study.lease_owner is None
        assert "worker lost" in (study.status_reason or "")
    # After max_attempts, a lost worker fails the study instead.
    with sessions.begin() as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(
                status=StudyStatus.PROCESSING,
                lease_owner="dead",
                lease_until=now - timedelta(seconds=1),
                attempts=3,
            )
        )
    pipeline.recover()
    with sessions() as session:
        assert session.execute(select(Study.status)).scalar_one() == StudyStatus.FAILED
