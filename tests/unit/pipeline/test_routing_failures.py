"""A study that cannot be routed waits with its reason; it never stops the supervisor.

Studies are catalogued as the SCP would (``Catalog.record_instance``, files in a real
store); the broker is replaced by a recorder of what would be sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from node.config import Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Export, ExportState, Instance, Study, StudyStatus
from node.db.types import utcnow
from node.errors import StudyPurged
from node.export import deliveries
from node.pipeline import Pipeline
from node.routing.attributes import study_series_attributes
from node.routing.store import RuleStore
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT, ct_instance
from tests.unit.pipeline.studies import PACS, TO_PACS, queued_study, receive
from tests.unit.pipeline.test_retries import RecordingCelery


@pytest.fixture
def pipeline(tmp_path: Path, database_url: str) -> Iterator[Pipeline]:
    settings = Settings.model_validate(node_config(tmp_path, database_url))
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    rules = RuleStore(sessions)
    rules.ensure_seeded(None)
    store = InstanceStore(settings.storage.data_dir)
    yield Pipeline(settings, sessions, store, rules, RecordingCelery())
    engine.dispose()


def _receive(
    pipeline: Pipeline, study: str, series: str, number: int = 1, *, write: bool = True
) -> str:
    """Catalogue one CT instance (and write its file unless ``write`` is false)."""
    ds = ct_instance(study, series, number)
    return receive(pipeline.sessions, pipeline.store, ds, write=write)


def _complete(pipeline: Pipeline, study_uid: str) -> int:
    with pipeline.sessions.begin() as session:
        return session.execute(
            update(Study)
            .where(Study.study_instance_uid == study_uid)
            .values(status=StudyStatus.COMPLETE, completed_at=utcnow())
            .returning(Study.id)
        ).scalar_one()


def _study(pipeline: Pipeline, study_id: int) -> Study:
    with pipeline.sessions() as session:
        return session.get_one(Study, study_id)


def test_unroutable_study_waits_with_its_reason_and_others_go_on(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    broken_uid, series = generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT)
    rel = _receive(pipeline, broken_uid, series, write=False)  # its file is gone
    broken = _complete(pipeline, broken_uid)
    # Another study's worker died: recovery must still run and send it again.
    other = queued_study(pipeline.sessions, generate_uid(prefix=TEST_ROOT), ["lung-seg"])
    with pipeline.sessions.begin() as session:
        session.execute(
            update(Study)
            .where(Study.id == other)
            .values(
                status=StudyStatus.PROCESSING,
                attempts=1,
                lease_owner="dead",
                lease_until=utcnow() - timedelta(seconds=1),
            )
        )

    with caplog.at_level(logging.ERROR, logger="node.pipeline"):
        for _ in range(3):
            pipeline.tick()
    study = _study(pipeline, broken)
    assert study.status == StudyStatus.COMPLETE
    assert (study.status_reason or "").startswith("routing failed, retrying: ")
    assert "cannot read a header of series" in (study.status_reason or "")
    failures = [r for r in caplog.records if "routing failed" in r.getMessage()]
    assert len(failures) == 1, "each reason is logged once, not every tick"
    assert _study(pipeline, other).status == StudyStatus.QUEUED
    celery = pipeline.celery
    assert isinstance(celery, RecordingCelery) and [a for a, _ in celery.sent] == [[other, 1]]

    # The file is back (a storage outage ended): the next tick routes the study.
    ct_instance(broken_uid, series, 1).save_as(pipeline.store.path(rel), enforce_file_format=True)
    pipeline.tick()
    assert _study(pipeline, broken).status in (StudyStatus.QUEUED, StudyStatus.NOT_ROUTED)


def test_series_purged_by_retention_are_left_out_of_routing(pipeline: Pipeline) -> None:
    """A late instance re-opens a purged study: it is routed on what is still stored."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    old, late = generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, old, write=False)
    with pipeline.sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
    _receive(pipeline, study_uid, late, 2)
    study_id = _complete(pipeline, study_uid)
    with pipeline.sessions() as session:
        kept = study_series_attributes(session, pipeline.store, study_id)
    assert [s.series_instance_uid for s in kept] == [late]
    assert pipeline.route_or_note(study_id, 1, study_uid) in (
        StudyStatus.QUEUED,
        StudyStatus.NOT_ROUTED,
    )


def test_reprocessing_a_purged_study_says_why_it_cannot(pipeline: Pipeline) -> None:
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, generate_uid(prefix=TEST_ROOT), write=False)
    with pipeline.sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
        session.execute(update(Study).values(status=StudyStatus.DONE, purged_at=utcnow()))
    with pytest.raises(StudyPurged, match="purged by retention"):
        pipeline.reprocess(study_uid)
    with pipeline.sessions() as session:
        assert session.scalar(select(Study.status)) == StudyStatus.DONE
    assert pipeline.reprocess(generate_uid(prefix=TEST_ROOT)) is None


def test_reprocessing_a_partly_restored_study_says_some_images_are_gone(
    pipeline: Pipeline,
) -> None:
    """Only some purged images were sent again: the message says so, not "its images"."""
    study_uid, series = generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, series, 1, write=False)
    _receive(pipeline, study_uid, series, 2, write=False)
    with pipeline.sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
        first = session.scalars(select(Instance.sop_instance_uid)).first()
        session.execute(
            update(Instance).where(Instance.sop_instance_uid == first).values(purged_at=None)
        )
        session.execute(update(Study).values(status=StudyStatus.DONE, purged_at=utcnow()))
    with pytest.raises(StudyPurged, match="some of its images were purged") as raised:
        pipeline.reprocess(study_uid)
    assert "send the whole study again" in str(raised.value)


def test_reprocess_reports_the_routing_the_supervisor_did_first(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's supervisor ticks on its own thread: it may route a study that reprocess
    has just made complete. reprocess then says where the study is, not "complete"."""
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, generate_uid(prefix=TEST_ROOT))
    study_id = _complete(pipeline, study_uid)
    assert pipeline.route_or_note(study_id, 1, study_uid) is not None
    with pipeline.sessions.begin() as session:
        session.execute(update(Study).values(status=StudyStatus.DONE))
    route_or_note = pipeline.route_or_note

    def supervisor_first(study_id: int, version: int, uid: str) -> StudyStatus | None:
        routed = route_or_note(study_id, version, uid)  # the tick
        assert routed is not None
        return route_or_note(study_id, version, uid)  # reprocess's own: routed meanwhile

    monkeypatch.setattr(pipeline, "route_or_note", supervisor_first)
    assert pipeline.reprocess(study_uid) in (StudyStatus.QUEUED, StudyStatus.NOT_ROUTED)


def test_originals_that_cannot_be_queued_are_routed_again_with_the_study(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails while the originals are queued for PACS: the study is not left
    queued without them (nothing would queue them later), it waits complete and the next
    tick routes it and queues them."""
    settings = pipeline.settings.model_copy(update={"destinations": [PACS]})
    pipeline.rules.save(TO_PACS, "test")
    forwarding = Pipeline(
        settings, pipeline.sessions, pipeline.store, pipeline.rules, pipeline.celery
    )
    study_uid = generate_uid(prefix=TEST_ROOT)
    _receive(pipeline, study_uid, generate_uid(prefix=TEST_ROOT))
    study_id = _complete(pipeline, study_uid)
    enqueue = deliveries.enqueue

    def connection_lost(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(deliveries, "enqueue", enqueue)  # once
        raise OperationalError("INSERT INTO exports", {}, Exception("server closed the connection"))

    monkeypatch.setattr(deliveries, "enqueue", connection_lost)
    assert forwarding.route_or_note(study_id, 1, study_uid) is None
    study = _study(pipeline, study_id)
    assert study.status == StudyStatus.COMPLETE
    assert study.status_reason == "routing failed, retrying: OperationalError"

    forwarding.tick()
    assert _study(pipeline, study_id).status == StudyStatus.QUEUED
    with pipeline.sessions() as session:
        originals = session.execute(select(Export.kind, Export.state, Export.study_version)).all()
    assert [tuple(row) for row in originals] == [("original", ExportState.PENDING, 1)]
    celery = pipeline.celery
    assert isinstance(celery, RecordingCelery) and celery.sent == [([study_id, 1], "routine")]
