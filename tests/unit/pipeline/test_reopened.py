"""A late instance re-opens a processed study: what its new version reads, forwards, and
how urgent it stays.

Studies are catalogued as the SCP would (files in a real store), purged by the real
retention, routed by the real pipeline and analysed by the real worker code with
stand-in models (every image 'pneumonia', probability 0.9); the broker is a recorder.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from node.catalog import Catalog
from node.config import RetentionSettings, Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Export, ExportState, Finding, Priority, Study, StudyStatus
from node.db.types import utcnow
from node.pipeline import Pipeline
from node.retention import Retention
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT
from tests.unit.output.conftest import synthetic_cr
from tests.unit.pipeline.studies import PACS, TO_PACS, receive
from tests.unit.pipeline.test_retries import FailingRunner, RecordingCelery
from tests.unit.workers.test_processing_objects import FixedRunner
from workers.inference import Classification
from workers.processing import Outcome, StudyProcessor


@pytest.fixture
def pipeline(tmp_path: Path, database_url: str) -> Iterator[Pipeline]:
    # One attempt: a study whose models fail is failed at once.
    cfg = node_config(tmp_path, database_url, pipeline={"max_attempts": 1})
    settings = Settings.model_validate(cfg)
    settings = settings.model_copy(update={"destinations": [PACS]})
    assert settings.worker.storage == "auto"  # shared when the files are here, else DICOMweb
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    rules = RuleStore(sessions)
    rules.save(TO_PACS, "test")
    store = InstanceStore(settings.storage.data_dir)
    yield Pipeline(settings, sessions, store, rules, RecordingCelery())
    engine.dispose()


def _receive(pipeline: Pipeline, study_uid: str, name: str) -> str:
    """Catalogue a frontal chest CR of the study, all in one series; returns its UID."""
    ds = synthetic_cr()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, "series"])
    ds.SOPInstanceUID = generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, name])
    receive(pipeline.sessions, pipeline.store, ds)
    return str(ds.SOPInstanceUID)


def _complete(pipeline: Pipeline) -> None:
    """The quiet time of every receiving study is over: complete and route them."""
    done = Catalog(pipeline.sessions).complete_quiet_studies(0, utcnow() + timedelta(seconds=1))
    pipeline.on_complete(done)


def _study(pipeline: Pipeline, study_uid: str) -> Study:
    with pipeline.sessions() as session:
        return session.execute(
            select(Study).where(Study.study_instance_uid == study_uid)
        ).scalar_one()


class NothingFoundRunner(FixedRunner):
    """Stands where the models run: no image shows pneumonia (probability 0.1)."""

    def classify(self, images: Sequence[np.ndarray]) -> Classification:
        found = super().classify(images)
        return Classification(1 - found.probabilities, found.heatmaps, found.milliseconds)


def _process(pipeline: Pipeline, study_uid: str, runner: object | None = None) -> Outcome:
    """Run the worker on the study's current version (worker.storage as configured)."""
    study = _study(pipeline, study_uid)
    runner = runner or FixedRunner()
    processor = StudyProcessor(pipeline.settings, pipeline.sessions, runner)  # type: ignore[arg-type]
    return processor.run(study.id, study.version)


def _purge(pipeline: Pipeline) -> None:
    """Retention runs eight days later and removes the files of every finished study."""
    retention = Retention(RetentionSettings(instances_days=7), pipeline.sessions, pipeline.store)
    assert retention.run(now=utcnow() + timedelta(days=8)).studies


def _originals(pipeline: Pipeline) -> dict[str, tuple[str, int]]:
    """SOP Instance UID -> (state, study version) of each original queued for PACS."""
    with pipeline.sessions() as session:
        rows = session.execute(
            select(Export.sop_instance_uid, Export.state, Export.study_version).where(
                Export.kind == "original"
            )
        ).all()
    return {r.sop_instance_uid: (r.state, r.study_version) for r in rows}


def _set_state(pipeline: Pipeline, state: ExportState, *sop_uids: str) -> None:
    with pipeline.sessions.begin() as session:
        session.execute(
            update(Export).where(Export.sop_instance_uid.in_(sop_uids)).values(state=state)
        )


def test_a_purged_study_reopened_by_a_late_image_is_analysed_on_what_is_stored(
    pipeline: Pipeline,
) -> None:
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, "first")
    _complete(pipeline)
    assert _process(pipeline, study_uid).state == "done"
    with pipeline.sessions.begin() as session:  # PACS has the original and the results
        session.execute(update(Export).values(state=ExportState.DELIVERED))
    _purge(pipeline)

    late = _receive(pipeline, study_uid, "late")  # a repeat view, after the purge
    _complete(pipeline)
    outcome = _process(pipeline, study_uid)
    assert outcome.state == "done", outcome.reason
    study = _study(pipeline, study_uid)
    assert study.version == 2 and study.status == StudyStatus.DONE
    assert study.status_reason is None  # no "unreadable image" for the purged one
    with pipeline.sessions() as session:
        analysed = set(
            session.scalars(
                select(Finding.sop_instance_uid).where(
                    Finding.study_id == study.id,
                    Finding.study_version == 2,
                    Finding.sop_instance_uid.is_not(None),
                )
            )
        )
    assert analysed == {late}


def test_a_reopened_study_forwards_only_the_originals_pacs_lacks(pipeline: Pipeline) -> None:
    """Delivered originals are not sent twice, purged ones cannot be, failed ones are retried."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    a, b = _receive(pipeline, study_uid, "a"), _receive(pipeline, study_uid, "b")
    _complete(pipeline)
    assert _originals(pipeline) == {
        a: (ExportState.PENDING, 1),
        b: (ExportState.PENDING, 1),
    }
    _set_state(pipeline, ExportState.DELIVERED, a)
    _set_state(pipeline, ExportState.FAILED, b)
    with pipeline.sessions.begin() as session:  # v1 done
        session.execute(update(Study).values(status=StudyStatus.DONE))

    c = _receive(pipeline, study_uid, "c")  # re-opens the study: version 2
    _complete(pipeline)
    assert _study(pipeline, study_uid).status == StudyStatus.QUEUED
    assert _originals(pipeline) == {
        a: (ExportState.DELIVERED, 1),
        b: (ExportState.PENDING, 2),
        c: (ExportState.PENDING, 2),
    }

    # PACS takes b, refuses c; v2 is done and retention purges every file of the study.
    _set_state(pipeline, ExportState.DELIVERED, b)
    _set_state(pipeline, ExportState.FAILED, c)
    with pipeline.sessions.begin() as session:
        session.execute(update(Study).values(status=StudyStatus.DONE))
    _purge(pipeline)

    d = _receive(pipeline, study_uid, "d")  # version 3: only d still has a file
    _complete(pipeline)
    assert _originals(pipeline) == {
        a: (ExportState.DELIVERED, 1),
        b: (ExportState.DELIVERED, 2),
        c: (ExportState.FAILED, 2),
        d: (ExportState.PENDING, 3),
    }


def test_a_late_image_keeps_the_urgency_the_findings_earned(pipeline: Pipeline) -> None:
    """v1 found pneumonia (0.9) and was escalated to urgent. A late image re-opens the study,
    which still shows that finding: v2 goes to the urgent queue and stays urgent if it fails.
    Only a new result that finds nothing brings it back to the rule's routine."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, "first")
    _complete(pipeline)
    assert _process(pipeline, study_uid).state == "done"
    study = _study(pipeline, study_uid)
    assert (study.priority, study.base_priority) == (Priority.URGENT, Priority.ROUTINE)

    _receive(pipeline, study_uid, "late")
    _complete(pipeline)
    study = _study(pipeline, study_uid)
    assert study.status == StudyStatus.QUEUED and study.version == 2
    assert (study.priority, study.base_priority) == (Priority.URGENT, Priority.ROUTINE)
    celery = pipeline.celery
    assert isinstance(celery, RecordingCelery) and celery.sent[-1] == ([study.id, 2], "urgent")

    assert _process(pipeline, study_uid, FailingRunner()).state == "failed"
    study = _study(pipeline, study_uid)
    assert study.priority == Priority.URGENT
    assert study.key_finding == "pneumonia (previous version)"  # v2 has no result
    assert study.key_score == pytest.approx(0.9)

    _receive(pipeline, study_uid, "third")
    _complete(pipeline)
    assert _process(pipeline, study_uid, NothingFoundRunner()).state == "done"
    study = _study(pipeline, study_uid)
    assert study.version == 3 and study.key_finding == "normal"
    assert study.priority == Priority.ROUTINE


def test_a_reopened_study_does_not_resend_originals_a_destination_refused_for_good(
    pipeline: Pipeline,
) -> None:
    """PACS refused a and c for good (a failure status; a SOP class it does not take):
    the same bytes would be refused again, so a new version sends them no more. b only
    timed out (a temporary status until the retry window closed): it is sent again."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    a, b, c = (_receive(pipeline, study_uid, name) for name in ("a", "b", "c"))
    _complete(pipeline)
    outcomes = {
        a: (0xA900, "C-STORE status 0xA900"),
        b: (0xA700, "gave up after 9 attempts: C-STORE status 0xA700"),
        c: (None, "destination does not accept SOP class 1.2.840.10008.5.1.4.1.1.1"),
    }
    with pipeline.sessions.begin() as session:
        for sop_uid, (status, error) in outcomes.items():
            session.execute(
                update(Export)
                .where(Export.sop_instance_uid == sop_uid)
                .values(state=ExportState.FAILED, last_status=status, last_error=error)
            )
        session.execute(update(Study).values(status=StudyStatus.DONE))

    d = _receive(pipeline, study_uid, "d")  # re-opens the study: version 2
    _complete(pipeline)
    assert _originals(pipeline) == {
        a: (ExportState.FAILED, 1),
        b: (ExportState.PENDING, 2),
        c: (ExportState.FAILED, 1),
        d: (ExportState.PENDING, 2),
    }


def test_a_reopened_study_shows_its_key_finding_as_the_previous_versions(
    pipeline: Pipeline,
) -> None:
    """New images re-open a study: until the new version is analysed, the worklist shows
    the finding it has as the previous version's (the flag and urgency stay: a possible
    pneumonia is not hidden); the new result replaces it; every version's findings stay."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, "first")
    _complete(pipeline)
    assert _process(pipeline, study_uid).state == "done"
    assert _study(pipeline, study_uid).key_finding == "pneumonia"

    _receive(pipeline, study_uid, "late")  # version 2, receiving
    study = _study(pipeline, study_uid)
    assert (study.version, study.status) == (2, StudyStatus.RECEIVING)
    assert study.key_finding == "pneumonia (previous version)"
    assert study.key_score == pytest.approx(0.9)
    _complete(pipeline)
    _receive(pipeline, study_uid, "later")  # version 3 before 2 was analysed: marked once
    _complete(pipeline)
    study = _study(pipeline, study_uid)
    assert (study.version, study.status) == (3, StudyStatus.QUEUED)
    assert study.key_finding == "pneumonia (previous version)"
    assert study.priority == Priority.URGENT

    assert _process(pipeline, study_uid, NothingFoundRunner()).state == "done"
    study = _study(pipeline, study_uid)
    assert study.key_finding == "normal" and study.key_score == pytest.approx(0.1)
    with pipeline.sessions() as session:
        versions = session.scalars(
            select(Finding.study_version).where(Finding.sop_instance_uid.is_(None))
        ).all()
    assert sorted(versions) == [1, 3]
