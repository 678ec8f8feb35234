"""The supervisor re-sends a queued study's message only when the broker no longer has it.

A long backlog keeps messages waiting longer than the lease. Re-sending every queued
study older than the lease then put a second (third, ...) message behind each one
still waiting. The broker here is the real embedded one (a SQLite file), no worker
consumes from it: what it holds is what the supervisor sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import update

from node.config import Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Study
from node.db.types import utcnow
from node.observability.metrics import queue_depths
from node.pipeline import Pipeline
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.unit.pipeline.studies import queued_study
from workers.celery_app import make_celery


@pytest.fixture
def pipeline(tmp_path: Path, database_url: str) -> Iterator[Pipeline]:
    settings = Settings.model_validate(node_config(tmp_path, database_url))
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    celery = make_celery(settings)
    yield Pipeline(
        settings, sessions, InstanceStore(settings.storage.data_dir), RuleStore(sessions), celery
    )
    engine.dispose()


def _waited_past_the_lease(pipeline: Pipeline) -> None:
    """Every queued study's message was sent longer than a lease ago."""
    long_ago = utcnow() - timedelta(seconds=pipeline.settings.pipeline.lease_seconds * 2)
    with pipeline.sessions.begin() as session:
        session.execute(
            update(Study).where(Study.queued_at.is_not(None)).values(queued_at=long_ago)
        )


def _lose_messages(celery: Celery, queue: str) -> None:
    """The broker loses what it held (a Redis without persistence restarted, say)."""
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def test_a_message_still_waiting_in_the_broker_is_not_sent_again(pipeline: Pipeline) -> None:
    backlog = [
        queued_study(pipeline.sessions, f"1.2.826.0.1.3680043.10.1234.9{n}", ["pneumonia-triage"])
        for n in range(3)
    ]
    with pipeline.sessions.begin() as session:
        session.execute(update(Study).values(queued_at=None))
    assert pipeline.dispatch_due() == len(backlog)
    assert queue_depths(pipeline.celery) == {"stat": 0, "urgent": 0, "routine": 3}

    _waited_past_the_lease(pipeline)  # a long backlog: still waiting, not lost
    pipeline.recover()
    assert pipeline.dispatch_due() == 0
    assert queue_depths(pipeline.celery)["routine"] == 3

    _lose_messages(pipeline.celery, "routine")  # now they are lost: sent again, once
    pipeline.recover()
    assert pipeline.dispatch_due() == len(backlog)
    pipeline.recover()
    assert pipeline.dispatch_due() == 0
    assert queue_depths(pipeline.celery)["routine"] == 3
