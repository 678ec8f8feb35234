"""A study's lease while a worker holds it: renewed during a slow phase, honoured when lost.

A phase (fetching the study's instances over DICOMweb, a model run, uploading the
results) may take longer than ``pipeline.lease_seconds``. The worker's heartbeat
renews the lease meanwhile, so the supervisor does not hand the study to another
worker; a worker whose lease was lost anyway stops and writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from node.config import Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Finding, Study, StudyStatus
from node.pipeline import Pipeline
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT
from tests.unit.output.conftest import synthetic_cr
from tests.unit.pipeline.studies import TO_PACS, receive
from tests.unit.pipeline.test_reopened import _complete, _study
from tests.unit.pipeline.test_retries import RecordingCelery
from tests.unit.workers.test_processing_objects import FixedRunner
from workers.inference import Classification
from workers.processing import StudyProcessor
from workers.storage import InstanceRef, SharedStorage

LEASE = 1.0


@pytest.fixture
def pipeline(tmp_path: Path, database_url: str) -> Iterator[Pipeline]:
    cfg = node_config(tmp_path, database_url, pipeline={"lease_seconds": LEASE})
    settings = Settings.model_validate(cfg)
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    rules = RuleStore(sessions)
    rules.save(TO_PACS.replace('"PACS"', ""), "test")
    store = InstanceStore(settings.storage.data_dir)
    yield Pipeline(settings, sessions, store, rules, RecordingCelery())
    engine.dispose()


def _queued_study(pipeline: Pipeline) -> str:
    study_uid = generate_uid(prefix=TEST_ROOT)
    ds = synthetic_cr()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=TEST_ROOT)
    ds.SOPInstanceUID = generate_uid(prefix=TEST_ROOT)
    receive(pipeline.sessions, pipeline.store, ds)
    _complete(pipeline)
    assert _study(pipeline, study_uid).status == StudyStatus.QUEUED
    return study_uid


class RecordingStorage(SharedStorage):
    """The node's store for reading; the result files it is given are kept in memory."""

    def __init__(self, store: InstanceStore) -> None:
        super().__init__(store)
        self.results: dict[str, bytes] = {}

    def write_result(self, relative_path: str, data: bytes) -> None:
        self.results[relative_path] = data

    def for_study(self, refs: Sequence[InstanceRef]) -> RecordingStorage:
        return self


class SlowRunner(FixedRunner):
    """A model run longer than the lease; ``meanwhile`` runs once it is over."""

    def __init__(self, meanwhile: object) -> None:
        self.meanwhile = meanwhile

    def classify(self, images: Sequence[np.ndarray]) -> Classification:
        time.sleep(2.5 * LEASE)
        self.meanwhile()  # type: ignore[operator]
        return super().classify(images)


def test_a_phase_longer_than_the_lease_keeps_the_study(pipeline: Pipeline) -> None:
    """The supervisor looks while a slow model runs: the lease was renewed, nothing moves."""
    study_uid = _queued_study(pipeline)
    study = _study(pipeline, study_uid)
    storage = RecordingStorage(pipeline.store)
    runner = SlowRunner(meanwhile=pipeline.recover)
    processor = StudyProcessor(pipeline.settings, pipeline.sessions, runner, storage)  # type: ignore[arg-type]
    outcome = processor.run(study.id, study.version)
    assert outcome.state == "done", outcome.reason
    study = _study(pipeline, study_uid)
    assert study.status == StudyStatus.DONE and study.attempts == 1
    assert study.key_finding == "pneumonia" and storage.results


def test_a_worker_that_lost_its_lease_stores_nothing(pipeline: Pipeline) -> None:
    """Another worker holds the study now: the first writes no findings and no files."""
    study_uid = _queued_study(pipeline)
    study = _study(pipeline, study_uid)

    def taken_over() -> None:
        with pipeline.sessions.begin() as session:
            session.execute(update(Study).values(lease_owner="another-worker"))

    storage = RecordingStorage(pipeline.store)
    processor = StudyProcessor(
        pipeline.settings,
        pipeline.sessions,
        SlowRunner(meanwhile=taken_over),  # type: ignore[arg-type]
        storage,
    )
    outcome = processor.run(study.id, study.version)
    assert (outcome.state, outcome.reason) == ("skipped", "lease lost")
    assert storage.results == {}  # no heatmap, no SEG/SR over the other worker's
    with pipeline.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == 0
        assert session.scalar(select(Study.lease_owner)) == "another-worker"
