"""A Celery pool process dies holding a study: it is queued again at once, not after the lease.

The message is a real one, sent by the pipeline through the embedded broker (a
SQLite file) and read back; the Celery parent's handling of it is Celery's own
``Request``, with the task's request class, told that its pool process was lost.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from billiard.einfo import ExceptionInfo
from celery.exceptions import WorkerLostError
from celery.utils.imports import symbol_by_name
from kombu import Message
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Priority, Study, StudyStatus
from node.db.types import utcnow
from node.observability.metrics import queue_depths
from node.pipeline import Pipeline
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.unit.pipeline.studies import queued_study
from workers import tasks
from workers.celery_app import PROCESS_STUDY, make_celery
from workers.processing import run_owner


@pytest.fixture
def pipeline(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Pipeline]:
    """A supervisor on a real embedded broker; the Celery parent on the test database."""
    settings = Settings.model_validate(node_config(tmp_path, pipeline={"max_attempts": 3}))
    monkeypatch.setattr(tasks, "settings_from_environment", lambda: settings)
    monkeypatch.setattr(tasks, "make_engine", lambda url: sessions.kw["bind"])
    celery = make_celery(settings)
    yield Pipeline(
        settings, sessions, InstanceStore(settings.storage.data_dir), RuleStore(sessions), celery
    )


def _dead_pid() -> int:
    """The pid of a process that has exited (as a killed pool process has)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def _received(pipeline: Pipeline, queue: str) -> Message:
    """The next message of ``queue``, as the Celery parent receives it."""
    with pipeline.celery.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        message = simple.get(timeout=5)
        simple.close()
    assert isinstance(message, Message)
    return message


def test_a_lost_pool_process_has_its_study_queued_again_at_once(
    pipeline: Pipeline,
) -> None:
    sessions = pipeline.sessions
    queued_study(sessions, "1.2.826.0.1.3680043.10.1234.88", ["pneumonia-triage"])
    with sessions.begin() as session:
        session.execute(update(Study).values(queued_at=None, priority=Priority.STAT))
    assert pipeline.dispatch_due() == 1
    message = _received(pipeline, "stat")

    task = pipeline.celery.tasks[PROCESS_STUDY]
    rejected: list[bool] = []
    request = symbol_by_name(task.Request)(
        message,
        app=pipeline.celery,
        task=task,
        on_reject=lambda logger, errors, requeue: rejected.append(requeue),
    )
    pid = _dead_pid()
    # The pool process took it and claimed the study, with a lease of ten minutes...
    request.on_accepted(pid, time.monotonic())
    with sessions.begin() as session:
        session.execute(
            update(Study).values(
                status=StudyStatus.PROCESSING,
                lease_owner=run_owner(pid, request.id),
                lease_until=utcnow() + timedelta(minutes=10),
                attempts=1,
            )
        )
    # ...and was killed (SIGKILL, out of memory): the parent is told.
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)")
    except WorkerLostError:
        request.on_failure(ExceptionInfo())
    assert rejected == [True]  # Celery gives the message back, as before

    # The study is queued again at once, not ten minutes later, its message counted as
    # sent: the one given back claims it, in the stat queue; none is sent twice.
    with sessions() as session:
        study = session.execute(select(Study)).scalar_one()
    assert study.status == StudyStatus.QUEUED and study.lease_owner is None
    assert study.queued_at is not None and study.lease_until is None
    assert "worker lost during attempt 1" in (study.status_reason or "")
    pipeline.recover()
    assert pipeline.dispatch_due() == 0
    assert queue_depths(pipeline.celery)["stat"] == 1


def test_a_lost_process_leaves_a_study_another_run_holds(pipeline: Pipeline) -> None:
    """The study was handed out again meanwhile: the new run keeps it."""
    sessions = pipeline.sessions
    queued_study(sessions, "1.2.826.0.1.3680043.10.1234.89", ["pneumonia-triage"])
    with sessions.begin() as session:
        session.execute(update(Study).values(queued_at=None))
    assert pipeline.dispatch_due() == 1
    message = _received(pipeline, "routine")
    task = pipeline.celery.tasks[PROCESS_STUDY]
    request = symbol_by_name(task.Request)(message, app=pipeline.celery, task=task)
    request.on_accepted(_dead_pid(), time.monotonic())
    until = utcnow() + timedelta(minutes=10)
    with sessions.begin() as session:
        session.execute(
            update(Study).values(
                status=StudyStatus.PROCESSING, lease_owner="4242-another-run", lease_until=until
            )
        )
    try:
        raise WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)")
    except WorkerLostError:
        request.on_failure(ExceptionInfo())
    pipeline.recover()
    with sessions() as session:
        study = session.execute(select(Study)).scalar_one()
    assert (study.status, study.lease_owner, study.lease_until) == (
        StudyStatus.PROCESSING,
        "4242-another-run",
        until,
    )
