"""The catalogue on SQLite and PostgreSQL: idempotent recording, completion, re-opening."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.db import migrate
from node.db.engine import READ_ONLY, make_engine, make_sessionmaker
from node.db.models import Instance, Series, Study, StudyStatus
from node.db.types import utcnow
from node.ingest.inspect import InstanceHeader
from node.storage import StoredFile
from tests.dicomgen import TEST_ROOT
from tests.nodes import postgres_database

_serial = itertools.count(1)


def uid() -> str:
    """Short UIDs, so that an instance number can be appended within 64 characters."""
    return f"{TEST_ROOT}{next(_serial)}"


def header(study: str, series: str, n: int, modality: str = "CT") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=CTImageStorage,
        sop_instance_uid=f"{study}.{n}",
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        accession_number="A1",
    )


def stored(n: int) -> StoredFile:
    return StoredFile(f"instances/x/{n}.dcm", 1000 + n, "0" * 64)


def test_records_study_series_and_counts(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, s1, s2 = (uid() for _ in range(3))
    for n in range(3):
        catalog.record_instance(header(study, s1, n), stored(n), "CT1")
    catalog.record_instance(header(study, s2, 9, modality="SR"), stored(9), "CT1")
    with sessions() as session:
        row = session.execute(select(Study).where(Study.study_instance_uid == study)).scalar_one()
        assert (row.instance_count, row.series_count) == (4, 2)
        assert row.modalities == "CT\\SR"
        assert row.status == StudyStatus.RECEIVING
        assert row.size_bytes == 1000 + 1001 + 1002 + 1009
        counts = dict(
            session.execute(select(Series.series_instance_uid, Series.instance_count)).all()
        )
        assert counts == {s1: 3, s2: 1}


def test_same_instance_twice_is_recorded_once(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    first = catalog.record_instance(header(study, series, 1), stored(1), "CT1")
    second = catalog.record_instance(header(study, series, 1), stored(1), "CT1")
    assert first.is_new and not second.is_new
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(Instance.duplicate_count)) == 1
        assert session.scalar(select(Study.instance_count)) == 1


def test_quiet_study_completes_and_late_instance_reopens_it(
    sessions: sessionmaker[Session],
) -> None:
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    t0 = utcnow()
    catalog.record_instance(header(study, series, 1), stored(1), "CT1", now=t0)
    assert catalog.complete_quiet_studies(10, now=t0 + timedelta(seconds=5)) == []
    done = catalog.complete_quiet_studies(10, now=t0 + timedelta(seconds=11))
    assert [(d.study_instance_uid, d.version) for d in done] == [(study, 1)]
    assert catalog.complete_quiet_studies(10, now=t0 + timedelta(seconds=60)) == []

    late = catalog.record_instance(
        header(study, series, 2), stored(2), "CT1", now=t0 + timedelta(seconds=61)
    )
    assert late.reopened and late.study_version == 2
    with sessions() as session:
        row = session.execute(select(Study)).scalar_one()
        assert (row.status, row.version, row.instance_count, row.completed_at) == (
            StudyStatus.RECEIVING,
            2,
            2,
            None,
        )
        versions = (
            session.execute(select(Instance.study_version).order_by(Instance.id)).scalars().all()
        )
        assert versions == [1, 2]
    done = catalog.complete_quiet_studies(10, now=t0 + timedelta(seconds=80))
    assert [(d.study_instance_uid, d.version) for d in done] == [(study, 2)]


def test_quarantine_rows(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    catalog.record_quarantine(
        calling_ae_title="CT1",
        sop_class_uid="1.2",
        sop_instance_uid="x" * 80,
        status=0xC001,
        reason="dataset cannot be parsed",
        path="quarantine/a.dcm",
        size_bytes=10,
    )
    assert catalog.counts() == {}


def test_write_starts_only_for_a_new_instance_and_commits_after_it(
    sessions: sessionmaker[Session],
) -> None:
    """The duplicate check comes first; the durability wait runs before COMMIT."""
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    events: list[str] = []

    def start_write() -> Callable[[], object]:
        events.append("write started")

        def wait_durable() -> None:
            # Inside the transaction: no other session sees the row yet.
            engine = sessions.kw["bind"]
            with engine.connect().execution_options(**{READ_ONLY: True}) as other:
                visible = other.scalar(select(func.count()).select_from(Instance))
            events.append(f"durable, rows visible elsewhere: {visible}")

        return wait_durable

    first = catalog.record_instance(
        header(study, series, 1), stored(1), "CT1", start_write=start_write
    )
    again = catalog.record_instance(
        header(study, series, 1), stored(1), "CT1", start_write=start_write
    )
    assert first.is_new and not again.is_new and not again.purged
    assert events == ["write started", "durable, rows visible elsewhere: 0"]


def test_failed_write_records_nothing(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    catalog.record_instance(header(study, series, 1), stored(1), "CT1")

    def failing_write() -> Callable[[], object]:
        def wait_durable() -> None:
            raise OSError("disk gone")

        return wait_durable

    with pytest.raises(OSError):
        catalog.record_instance(
            header(study, series, 2), stored(2), "CT1", start_write=failing_write
        )
    with sessions() as session:
        row = session.execute(select(Study)).scalar_one()
        assert (row.instance_count, row.size_bytes) == (1, 1001)
        assert session.scalar(select(Series.instance_count)) == 1
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


def test_new_modality_and_body_part_on_a_receiving_study(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, s1, s2 = uid(), uid(), uid()
    catalog.record_instance(header(study, s1, 1), stored(1), "CT1")
    late = header(study, s2, 2, modality="PR")
    catalog.record_instance(replace(late, body_part_examined="CHEST"), stored(2), "CT1")
    catalog.record_instance(header(study, s2, 3, modality="PR"), stored(3), "CT1")
    with sessions() as session:
        row = session.execute(select(Study)).scalar_one()
        assert (row.modalities, row.body_part_examined, row.series_count) == ("CT\\PR", "CHEST", 2)


def test_purged_instance_is_reported_not_counted(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    catalog.record_instance(header(study, series, 1), stored(1), "CT1")
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
    started: list[bool] = []
    again = catalog.record_instance(
        header(study, series, 1),
        stored(1),
        "CT1",
        start_write=lambda: started.append(True) or (lambda: None),
    )
    assert again.purged and not again.is_new and started == []
    with sessions() as session:
        assert session.scalar(select(Instance.duplicate_count)) == 0


def test_purged_instance_is_restored_once(sessions: sessionmaker[Session]) -> None:
    """Two copies of a purged instance arriving together (two associations or two
    nodes): the first claims the row and places its file; the second places nothing."""
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    catalog.record_instance(header(study, series, 1), stored(1), "CT1")
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
        session.execute(update(Study).values(purged_at=utcnow()))
    placed: list[str] = []
    first = StoredFile("instances/first.dcm", 10, "a" * 64)
    second = StoredFile("instances/second.dcm", 10, "b" * 64)
    sop = header(study, series, 1).sop_instance_uid
    assert catalog.restore_purged(sop, first, place=lambda: placed.append("first"))
    assert not catalog.restore_purged(sop, second, place=lambda: placed.append("second"))
    assert placed == ["first"]
    with sessions() as session:
        row = session.execute(select(Instance)).scalar_one()
        assert (row.path, row.sha256, row.purged_at, row.duplicate_count) == (
            first.relative_path,
            first.sha256,
            None,
            2,
        )
        assert session.execute(select(Study.purged_at)).scalar_one() is None


def test_purged_study_sent_again_reopens_as_received_now(
    sessions: sessionmaker[Session],
) -> None:
    """A restored instance counts as received now, like a late one: retention's clock
    starts again, and a finished study re-opens as a new version to be analysed."""
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    t0 = utcnow() - timedelta(days=10)
    for n in (1, 2):
        catalog.record_instance(header(study, series, n), stored(n), "CT1", now=t0)
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=t0))
        session.execute(update(Study).values(status=StudyStatus.DONE, finished_at=t0, purged_at=t0))

    def restore(n: int, now: datetime) -> bool:
        copy = StoredFile(f"instances/again/{n}.dcm", 10, "a" * 64)
        return catalog.restore_purged(f"{study}.{n}", copy, place=lambda: None, now=now)

    def state() -> tuple[object, ...]:
        with sessions() as session:
            row = session.execute(select(Study)).scalar_one()
            series_received = session.scalar(select(Series.last_received_at))
        return row.status, row.version, row.finished_at, row.last_received_at, series_received

    t1 = utcnow()
    assert restore(1, t1)
    assert state() == (StudyStatus.RECEIVING, 2, None, t1, t1)
    with sessions() as session:  # the second instance is still gone
        assert session.scalar(select(Study.purged_at)) is not None
    t2 = t1 + timedelta(seconds=5)
    assert restore(2, t2)
    assert not restore(1, t2)  # a second copy: a duplicate, no new version
    assert state() == (StudyStatus.RECEIVING, 2, None, t2, t2)
    with sessions() as session:
        assert session.scalar(select(Study.purged_at)) is None
    done = catalog.complete_quiet_studies(10, now=t2 + timedelta(seconds=11))
    assert [(d.study_instance_uid, d.version) for d in done] == [(study, 2)]


def test_failed_placement_leaves_the_instance_purged(sessions: sessionmaker[Session]) -> None:
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    catalog.record_instance(header(study, series, 1), stored(1), "CT1")
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))

    def disk_full() -> None:
        raise OSError("no space")

    sop = header(study, series, 1).sop_instance_uid
    with pytest.raises(OSError):
        catalog.restore_purged(sop, StoredFile("instances/x.dcm", 1, "c" * 64), place=disk_full)
    with sessions() as session:
        row = session.execute(select(Instance)).scalar_one()
        assert row.purged_at is not None and row.path == stored(1).relative_path


@pytest.mark.postgres
def test_instance_inserted_by_another_node_meanwhile_counts_as_duplicate() -> None:
    """Two dicom nodes on one PostgreSQL database race on the same SOP Instance.

    (On SQLite, BEGIN IMMEDIATE serialises writers, so this window does not exist.)
    """
    with postgres_database() as url:
        engines = [make_engine(url), make_engine(url)]
        migrate.upgrade(engines[0])
        sessions = make_sessionmaker(engines[0])
        catalog, rival = Catalog(sessions), Catalog(make_sessionmaker(engines[1]))
        study, series = uid(), uid()
        catalog.record_instance(header(study, series, 1), stored(1), "CT1")

        def rival_wins() -> Callable[[], object]:
            rival.record_instance(header(study, series, 2), stored(2), "CT2")
            return lambda: None

        lost = catalog.record_instance(
            header(study, series, 2), stored(2), "CT1", start_write=rival_wins
        )
        assert not lost.is_new
        with sessions() as session:
            row = session.execute(select(Study)).scalar_one()
            assert row.instance_count == 2
            duplicates = session.scalar(
                select(Instance.duplicate_count).where(Instance.sop_instance_uid == f"{study}.2")
            )
            assert duplicates == 1
        for engine in engines:
            engine.dispose()


def test_restored_instance_counts_its_new_size_in_the_study(
    sessions: sessionmaker[Session],
) -> None:
    """The study's size is the sum of its instances' sizes, restored ones as re-sent
    (a sender may re-encode: another transfer syntax, another size)."""
    catalog = Catalog(sessions)
    study, series = uid(), uid()
    for n in (1, 2):
        catalog.record_instance(header(study, series, n), stored(n), "CT1")
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
        session.execute(update(Study).values(status=StudyStatus.DONE, purged_at=utcnow()))
    copy = StoredFile("instances/again/1.dcm", 5000, "a" * 64)
    assert catalog.restore_purged(f"{study}.1", copy, place=lambda: None)
    assert not catalog.restore_purged(f"{study}.1", copy, place=lambda: None)  # a duplicate
    with sessions() as session:
        total = session.scalar(select(func.sum(Instance.size_bytes)))
        assert session.scalar(select(Study.size_bytes)) == total == 5000 + stored(2).size_bytes
