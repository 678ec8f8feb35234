"""Retention: received images purged when old and finished; findings, rows and audit stay.

A real node (SQLite and PostgreSQL) receives instances over DICOM (storescu); the
purge runs at a chosen ``now`` days ahead instead of waiting for days to pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select, update
from typer.testing import CliRunner

from node.cli import app as cli_app
from node.db.models import (
    AuditEvent,
    Export,
    ExportState,
    Finding,
    Instance,
    QuarantinedInstance,
    Role,
    Study,
    StudyStatus,
)
from node.db.types import utcnow
from node.errors import StudyPurged
from node.retention import AUDIT_USER, PurgedStudy, Retention
from node.runtime import Node
from node.users.accounts import Accounts
from node.web.app import create_app
from tests.dicomgen import Patient, write_series
from tests.nodes import SHARED_DATA, write_config
from tests.peers import raw_store, storescu

PATIENT = Patient(name="Retention^Rosalind", patient_id="PID-RET-4711", birth_date="19610203")
LATER = timedelta(days=8)


def _receive(node: Node, tmp_path: Path, name: str, count: int = 3) -> str:
    uid, files = write_series(tmp_path / name, count, patient=PATIENT)
    result = storescu(node.dicom.port, files)
    assert result.returncode == 0, result.stderr
    return uid


def _set_status(node: Node, uid: str, status: StudyStatus) -> None:
    with node.sessions.begin() as session:
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(status=status))


def _files(node: Node, uid: str) -> list[Path]:
    with node.sessions() as session:
        paths = session.scalars(
            select(Instance.path).join(Study).where(Study.study_instance_uid == uid)
        ).all()
    return [node.store.path(p) for p in paths]


@pytest.fixture
def node(start_node: Callable[..., Node], database_url: str) -> Node:
    return start_node(database_url, retention={"instances_days": 7, "quarantine_days": 30})


def test_finished_old_study_loses_files_and_keeps_rows_findings_and_audit(
    node: Node, tmp_path: Path
) -> None:
    uid = _receive(node, tmp_path, "a")
    _set_status(node, uid, StudyStatus.DONE)
    with node.sessions.begin() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        session.add(
            Finding(
                study_id=study.id,
                study_version=study.version,
                model_name="pneumonia-triage",
                model_version="1.1.0",
                kind="classification",
                label="PNEUMONIA",
                probability=0.9,
                created_at=utcnow(),
            )
        )
    files = _files(node, uid)
    assert len(files) == 3 and all(f.is_file() for f in files)
    size = sum(f.stat().st_size for f in files)
    retention = Retention(node.settings.retention, node.sessions, node.store)

    # Not yet old enough: nothing happens.
    assert retention.run().studies == []
    assert all(f.is_file() for f in files)

    report = retention.run(now=utcnow() + LATER)
    assert [s.study_instance_uid for s in report.studies] == [uid]
    assert report.instances == 3
    assert report.studies[0].bytes == size
    assert not any(f.exists() for f in files)
    assert not (node.store.instances_dir / uid).exists(), "empty study folder left behind"

    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert study.purged_at is not None
        assert study.patient_id == PATIENT.patient_id  # the catalogue row stays
        instances = session.scalars(select(Instance).where(Instance.study_id == study.id)).all()
        assert len(instances) == 3 and all(i.purged_at is not None for i in instances)
        assert session.scalars(select(Finding).where(Finding.study_id == study.id)).one()
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "retention.purge")
        ).all()
    assert [(e.user_name, e.study_instance_uid) for e in events] == [(AUDIT_USER, uid)]
    detail = events[0].detail or ""
    assert "instances=3" in detail
    for phi in (PATIENT.name, PATIENT.patient_id, PATIENT.birth_date, "Retention"):
        assert phi not in detail

    # A second run finds nothing more to do.
    assert retention.run(now=utcnow() + LATER).studies == []


def test_purged_instances_sent_again_are_stored_again(node: Node, tmp_path: Path) -> None:
    """A modality re-sending a purged study gets Success and the node has the files again."""
    uid, files = write_series(tmp_path / "r", 2, patient=PATIENT)
    assert storescu(node.dicom.port, files).returncode == 0
    _set_status(node, uid, StudyStatus.DONE)
    Retention(node.settings.retention, node.sessions, node.store).run(now=utcnow() + LATER)
    assert not any(f.exists() for f in _files(node, uid))

    assert storescu(node.dicom.port, files[:1]).returncode == 0
    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        rows = session.scalars(
            select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
        ).all()
        assert study.purged_at is not None  # one of two instances is still gone
        assert [r.purged_at is None for r in rows] == [True, False]
        # Re-opened as a new version, like a late instance; counted once.
        assert (study.status, study.version, study.instance_count) == (
            StudyStatus.RECEIVING,
            2,
            2,
        )
    restored = node.store.path(rows[0].path).read_bytes()
    assert hashlib.sha256(restored).hexdigest() == rows[0].sha256
    assert dcmread(BytesIO(restored)).PixelData == dcmread(files[0]).PixelData

    assert storescu(node.dicom.port, files[1:]).returncode == 0
    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert study.purged_at is None
    assert all(f.is_file() for f in _files(node, uid))


def test_purged_study_sent_again_is_kept_a_full_period_and_can_be_reprocessed(
    node: Node, tmp_path: Path
) -> None:
    """Re-sending a purged study, as reprocess tells the user to, re-opens it as a new
    version, and its age counts from the re-send: the next run keeps the files, and
    reprocess works again."""
    assert node.dicom is not None and node.pipeline is not None
    pipeline = node.pipeline
    uid, files = write_series(tmp_path / "r", 2, patient=PATIENT)
    assert storescu(node.dicom.port, files).returncode == 0
    _set_status(node, uid, StudyStatus.DONE)
    with node.sessions.begin() as session:
        session.execute(update(Study).values(last_received_at=utcnow() - LATER))
    retention = Retention(node.settings.retention, node.sessions, node.store)
    assert retention.run().instances == 2
    with pytest.raises(StudyPurged):
        pipeline.reprocess(uid)

    sent_again = utcnow()
    assert storescu(node.dicom.port, files).returncode == 0
    assert retention.run().studies == []  # the next hourly run
    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
    assert (study.status, study.version, study.purged_at) == (StudyStatus.RECEIVING, 2, None)
    assert study.last_received_at >= sent_again
    pipeline.on_complete(node.catalog.complete_quiet_studies(0))
    _set_status(node, uid, StudyStatus.DONE)  # analysed again

    assert retention.run().studies == []
    assert all(f.is_file() for f in _files(node, uid))
    assert pipeline.reprocess(uid) in (StudyStatus.QUEUED, StudyStatus.NOT_ROUTED)
    _set_status(node, uid, StudyStatus.DONE)
    report = retention.run(now=sent_again + LATER + timedelta(minutes=1))
    assert [(s.study_instance_uid, s.instances) for s in report.studies] == [(uid, 2)]


def test_file_restored_while_retention_deletes_is_not_deleted(node: Node, tmp_path: Path) -> None:
    """Retention commits the rows purged, then unlinks the files it listed. An
    instance re-sent in between gets a new file name, so the late unlink cannot
    take the copy that was just acknowledged."""
    uid, files = write_series(tmp_path / "r", 1, patient=PATIENT)
    assert storescu(node.dicom.port, files).returncode == 0
    _set_status(node, uid, StudyStatus.DONE)
    (listed,) = _files(node, uid)
    kept = listed.read_bytes()
    Retention(node.settings.retention, node.sessions, node.store).run(now=utcnow() + LATER)
    listed.parent.mkdir(parents=True, exist_ok=True)
    listed.write_bytes(kept)  # as if retention had not reached this file yet

    assert storescu(node.dicom.port, files).returncode == 0
    listed.unlink()  # retention's unlink, late
    (restored,) = _files(node, uid)
    assert restored != listed and restored.is_file()
    with node.sessions() as session:
        row = session.scalars(
            select(Instance).join(Study).where(Study.study_instance_uid == uid)
        ).one()
        assert row.purged_at is None
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == row.sha256


@pytest.mark.parametrize(
    "status",
    [StudyStatus.RECEIVING, StudyStatus.COMPLETE, StudyStatus.QUEUED, StudyStatus.PROCESSING],
)
def test_unfinished_studies_are_kept(node: Node, tmp_path: Path, status: StudyStatus) -> None:
    uid = _receive(node, tmp_path, "b", count=1)
    _set_status(node, uid, status)
    report = Retention(node.settings.retention, node.sessions, node.store).run(now=utcnow() + LATER)
    assert report.studies == []
    assert all(f.is_file() for f in _files(node, uid))


def test_pending_delivery_holds_the_files_until_delivered(node: Node, tmp_path: Path) -> None:
    uid = _receive(node, tmp_path, "c", count=1)
    _set_status(node, uid, StudyStatus.FAILED)
    with node.sessions.begin() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        instance = session.scalars(select(Instance).where(Instance.study_id == study.id)).one()
        now = utcnow()
        session.add(
            Export(
                study_id=study.id,
                study_version=study.version,
                destination="PACS",
                kind="original",
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                path=instance.path,
                state=ExportState.PENDING,
                created_at=now,
                retry_started_at=now,
            )
        )
    retention = Retention(node.settings.retention, node.sessions, node.store)
    assert retention.run(now=utcnow() + LATER).studies == []
    assert all(f.is_file() for f in _files(node, uid))

    with node.sessions.begin() as session:
        session.execute(update(Export).values(state=ExportState.DELIVERED))
    assert [s.study_instance_uid for s in retention.run(now=utcnow() + LATER).studies] == [uid]
    assert not any(f.exists() for f in _files(node, uid))


def test_dry_run_lists_and_changes_nothing(node: Node, tmp_path: Path) -> None:
    uid = _receive(node, tmp_path, "d", count=2)
    _set_status(node, uid, StudyStatus.NOT_ROUTED)
    report = Retention(node.settings.retention, node.sessions, node.store).run(
        dry_run=True, now=utcnow() + LATER
    )
    assert [(s.study_instance_uid, s.instances) for s in report.studies] == [(uid, 2)]
    assert all(f.is_file() for f in _files(node, uid))
    with node.sessions() as session:
        assert session.scalar(select(Study.purged_at)) is None
        assert session.scalar(select(AuditEvent.id)) is None


def test_quarantined_files_purged_after_quarantine_days(node: Node) -> None:
    sent = raw_store(node.dicom.port, SHARED_DATA / "dicom" / "broken" / "MR_truncated.dcm")
    assert sent.status is not None and sent.status >= 0xA700
    quarantined = sorted(node.store.quarantine_dir.iterdir())
    assert {p.suffix for p in quarantined} == {".dcm", ".json"}
    retention = Retention(node.settings.retention, node.sessions, node.store)

    assert retention.run(now=utcnow() + timedelta(days=29)).quarantine_files == 0
    report = retention.run(now=utcnow() + timedelta(days=31))
    assert report.quarantine_files == 1
    assert list(node.store.quarantine_dir.iterdir()) == []
    with node.sessions() as session:
        row = session.scalars(select(QuarantinedInstance)).one()
        assert row.purged_at is not None
        assert session.scalars(
            select(AuditEvent.action).where(AuditEvent.user_name == AUDIT_USER)
        ).all() == ["retention.quarantine"]


def test_study_page_and_image_of_a_purged_study(node: Node, tmp_path: Path) -> None:
    uid = _receive(node, tmp_path, "e", count=1)
    _set_status(node, uid, StudyStatus.DONE)
    with node.sessions() as session:
        sop = session.scalar(select(Instance.sop_instance_uid))
    Retention(node.settings.retention, node.sessions, node.store).run(now=utcnow() + LATER)
    Accounts(node.sessions).add("rad", "a-long-password", Role.RADIOLOGIST)
    with TestClient(create_app(node)) as client:
        r = client.post("/api/session", json={"name": "rad", "password": "a-long-password"})
        assert r.status_code == 200
        api = client.get(f"/api/studies/{uid}")
        assert api.status_code == 200
        assert api.json()["purged_at"] is not None
        assert api.json()["series"][0]["instances"][0]["purged_at"] is not None
        page = client.get(f"/studies/{uid}")
        assert page.status_code == 200
        assert "purged" in page.text and f"/instances/{sop}/image.png" not in page.text
        image = client.get(f"/api/studies/{uid}/instances/{sop}/image.png")
        assert image.status_code == 410


def test_runtime_starts_the_monitor_only_when_a_policy_is_set(
    start_node: Callable[..., Node],
) -> None:
    assert start_node(retention={"instances_days": 0, "quarantine_days": 0}).retention is None
    monitor = start_node(retention={"instances_days": 3}).retention
    assert monitor is not None and monitor.interval == 3600.0


def _due_study_and_config(node: Node, tmp_path: Path, name: str, count: int) -> tuple[str, Path]:
    """A finished study old enough to purge now, and a config file for the CLI."""
    uid = _receive(node, tmp_path, name, count=count)
    _set_status(node, uid, StudyStatus.DONE)
    with node.sessions.begin() as session:
        session.execute(update(Study).values(last_received_at=utcnow() - LATER))
    config = write_config(
        tmp_path / "node.toml",
        {
            "storage": {"data_dir": str(node.settings.storage.data_dir)},
            "database": {"url": node.settings.database_url},
            "retention": {"instances_days": 7},
        },
    )
    return uid, config


def test_cli_dry_run_then_run(node: Node, tmp_path: Path) -> None:
    uid, config = _due_study_and_config(node, tmp_path, "f", count=1)
    runner = CliRunner()
    args = ["retention", "run", "--json", "--config", str(config)]
    dry = runner.invoke(cli_app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    out = json.loads(dry.output)
    assert out["dry_run"] is True and [s["study_instance_uid"] for s in out["studies"]] == [uid]
    assert all(f.is_file() for f in _files(node, uid))

    real = runner.invoke(cli_app, args)
    assert real.exit_code == 0, real.output
    assert json.loads(real.output)["instances"] == 1
    assert not any(f.exists() for f in _files(node, uid))


def _unlink_fails_for(monkeypatch: pytest.MonkeyPatch, *victims: Path) -> None:
    """``Path.unlink`` refuses ``victims`` (tests run as root: permissions would not)."""
    unlink = Path.unlink

    def refusing(self: Path, missing_ok: bool = False) -> None:
        if self in victims:
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refusing)


def _purged(node: Node, uid: str) -> tuple[bool, list[bool]]:
    """Whether the study, and each of its instances (by id), is marked purged."""
    with node.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        marks = session.scalars(
            select(Instance.purged_at).where(Instance.study_id == study.id).order_by(Instance.id)
        ).all()
    return study.purged_at is not None, [m is not None for m in marks]


def test_a_file_that_cannot_be_deleted_is_not_purged_and_the_next_run_retries_it(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = _receive(node, tmp_path, "g", count=3)
    _set_status(node, uid, StudyStatus.DONE)
    files = _files(node, uid)
    sizes = {f: f.stat().st_size for f in files}
    with node.sessions() as session:
        stuck = node.store.path(
            session.scalars(select(Instance.path).order_by(Instance.id)).all()[1]
        )
    retention = Retention(node.settings.retention, node.sessions, node.store)
    _unlink_fails_for(monkeypatch, stuck)

    seen: list[PurgedStudy] = []
    report = retention.run(now=utcnow() + LATER, progress=seen.append)
    assert seen == report.studies
    assert (report.instances, report.failed_files) == (2, 1)
    assert [(s.instances, s.failed_files) for s in report.studies] == [(2, 1)]
    assert report.bytes == sum(size for f, size in sizes.items() if f != stuck)
    assert stuck.is_file() and [f for f in files if f.exists()] == [stuck]
    assert _purged(node, uid) == (True, [True, False, True])
    with node.sessions() as session:
        (detail,) = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "retention.purge")
        ).all()
    assert detail is not None and "instances=2 " in detail and "failed_files=1 " in detail

    monkeypatch.undo()
    again = retention.run(now=utcnow() + LATER)
    assert [(s.instances, s.failed_files) for s in again.studies] == [(1, 0)]
    assert not stuck.exists()
    assert _purged(node, uid) == (True, [True, True, True])


def test_a_study_none_of_whose_files_could_be_deleted_stays_unpurged(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = _receive(node, tmp_path, "h", count=2)
    _set_status(node, uid, StudyStatus.DONE)
    files = _files(node, uid)
    _unlink_fails_for(monkeypatch, *files)

    report = Retention(node.settings.retention, node.sessions, node.store).run(now=utcnow() + LATER)
    assert (report.instances, report.bytes, report.failed_files) == (0, 0, 2)
    assert all(f.is_file() for f in files)
    assert _purged(node, uid) == (False, [False, False])
    with node.sessions() as session:
        # Nothing went, so there is nothing to claim.
        assert (
            session.scalar(select(AuditEvent.id).where(AuditEvent.action.like("retention%")))
            is None
        )


def test_a_quarantined_file_that_cannot_be_deleted_is_not_purged(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw_store(node.dicom.port, SHARED_DATA / "dicom" / "broken" / "MR_truncated.dcm")
    (dcm,) = node.store.quarantine_dir.glob("*.dcm")
    retention = Retention(node.settings.retention, node.sessions, node.store)
    _unlink_fails_for(monkeypatch, dcm)

    report = retention.run(now=utcnow() + timedelta(days=31))
    assert (report.quarantine_files, report.quarantine_failed, report.failed_files) == (0, 1, 1)
    assert dcm.is_file()
    with node.sessions() as session:
        assert session.scalars(select(QuarantinedInstance)).one().purged_at is None

    monkeypatch.undo()
    assert retention.run(now=utcnow() + timedelta(days=31)).quarantine_files == 1
    assert list(node.store.quarantine_dir.iterdir()) == []


def test_cli_run_exits_1_and_says_how_many_files_could_not_be_deleted(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid, config = _due_study_and_config(node, tmp_path, "i", count=2)
    stuck = _files(node, uid)[0]
    _unlink_fails_for(monkeypatch, stuck)
    runner = CliRunner()

    result = runner.invoke(cli_app, ["retention", "run", "--json", "--config", str(config)])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert (out["instances"], out["failed_files"]) == (1, 1)
    assert "1 file(s) could not be deleted" in result.stderr

    monkeypatch.undo()
    result = runner.invoke(cli_app, ["retention", "run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "Purged 1 studies (1 instances)" in result.stdout
    assert not stuck.exists()
