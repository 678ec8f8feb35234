"""The task and the worker's /readyz when the settings cannot build the worker's storage.

worker.storage = "dicomweb" without cluster.node_url/token: a study must be claimed,
retried and failed with the reason (not left "queued" and re-sent forever), and the
worker must say it is not ready, and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Study, StudyStatus
from tests.conftest import node_config
from tests.unit.pipeline.studies import queued_study
from workers import inference, tasks
from workers.health import WorkerHealth

NO_NODE = {"storage": "dicomweb"}  # and no cluster.node_url nor cluster.token


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        node_config(
            tmp_path, worker=NO_NODE, pipeline={"max_attempts": 2, "retry_backoff_seconds": 0}
        )
    )


@pytest.fixture
def worker(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """``process_study`` in this process, on the test database, models never loaded."""
    monkeypatch.setattr(tasks, "settings_from_environment", lambda: settings)
    monkeypatch.setattr(tasks, "make_engine", lambda url: None)
    monkeypatch.setattr(tasks, "make_sessionmaker", lambda engine: sessions)
    monkeypatch.setattr(inference, "runner", lambda weights_dir=None: object())
    tasks._processor.cache_clear()
    yield
    tasks._processor.cache_clear()


def _state(sessions: sessionmaker[Session], study_id: int) -> tuple[StudyStatus, int, str]:
    with sessions() as session:
        status, attempts, reason = session.execute(
            select(Study.status, Study.attempts, Study.status_reason).where(Study.id == study_id)
        ).one()
    return status, attempts, reason or ""


def _requeue_now(sessions: sessionmaker[Session], study_id: int) -> None:
    """What the supervisor does once the retry's backoff has passed."""
    with sessions.begin() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.lease_until = None


@pytest.mark.usefixtures("worker")
def test_unbuildable_storage_is_retried_then_failed_with_the_reason(
    sessions: sessionmaker[Session],
) -> None:
    study_id = queued_study(sessions, "1.2.826.0.1.3680043.8.498.7001", ["pneumonia-triage"])

    assert tasks.process_study(study_id, 1) == "retry"
    status, attempts, reason = _state(sessions, study_id)
    assert status == StudyStatus.QUEUED and attempts == 1
    assert "StorageUnavailable" in reason and "cluster.node_url" in reason

    _requeue_now(sessions, study_id)
    assert tasks.process_study(study_id, 1) == "failed"
    status, attempts, reason = _state(sessions, study_id)
    assert status == StudyStatus.FAILED and attempts == 2
    assert "cluster.node_url and cluster.token" in reason


def test_readiness_reports_the_storage_configuration_error(settings: Settings) -> None:
    probes = WorkerHealth(object(), settings, "127.0.0.1", 0)
    try:
        probes.ready.set()
        code, body = probes.readiness()
        reasons: list[Any] = [r for r in body["reasons"] if r.startswith("worker.storage")]
    finally:
        probes.stop()
    assert code == 503
    assert len(reasons) == 1 and "cluster.node_url and cluster.token" in reasons[0]


def test_readiness_has_no_storage_reason_when_storage_builds(tmp_path: Path) -> None:
    settings = Settings.model_validate(node_config(tmp_path, worker={"storage": "shared"}))
    probes = WorkerHealth(object(), settings, "127.0.0.1", 0)
    try:
        assert probes.storage_problems() == []
    finally:
        probes.stop()
