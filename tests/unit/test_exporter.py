"""The exporter's bookkeeping around a real C-STORE: what is recorded after an attempt.

The destination is a pynetdicom storage SCP in this process; the exporter sends to
it over TCP as it would to a PACS. Both database backends.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Export, ExportState, Study, StudyStatus
from node.db.types import utcnow
from node.deid import Deidentifier
from node.export import deliveries
from node.export.exporter import Exporter
from node.export.scu import Outcome, classify
from node.storage import InstanceStore
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT, ct_instance
from tests.nodes import free_port


@dataclass
class Destination:
    """A storage SCP recording what arrives; ``during_store`` runs inside each C-STORE."""

    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    during_store: Callable[[], object] = lambda: None

    def on_store(self, event: evt.Event) -> int:
        self.during_store()
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture
def destination() -> Iterator[Destination]:
    peer = Destination()
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", peer.port), block=False, evt_handlers=[(evt.EVT_C_STORE, peer.on_store)]
    )
    yield peer
    server.shutdown()


def _exporter(
    tmp_path: Path, sessions: sessionmaker[Session], port: int, *, deidentify: bool = False
) -> Exporter:
    cfg = node_config(tmp_path)
    cfg["destinations"] = [
        {"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
        | ({"deidentify": True} if deidentify else {})
    ]
    cfg["privacy"] = {"pseudonym_key": "k" * 32}
    settings = Settings.model_validate(cfg)
    return Exporter(settings, sessions, InstanceStore(settings.storage.data_dir))


def _result(store: InstanceStore, name: str, sop_instance_uid: str) -> str:
    """A result object on disk (a CT instance stands in for a SEG or SR)."""
    ds: Dataset = ct_instance(generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1)
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    rel = f"results/{name}.dcm"
    store.path(rel).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(store.path(rel), enforce_file_format=True)
    return rel


def _queue(sessions: sessionmaker[Session], version: int, path: str, uid: str) -> None:
    with sessions.begin() as session:
        study_id = session.scalar(select(Study.id))
        if study_id is None:
            now = utcnow()
            study = Study(
                study_instance_uid=generate_uid(prefix=TEST_ROOT),
                status=StudyStatus.DONE,
                priority=0,
                version=1,
                series_count=1,
                instance_count=1,
                size_bytes=0,
                modalities="CT",
                calling_ae_title="CT1",
                first_received_at=now,
                last_received_at=now,
            )
            session.add(study)
            session.flush()
            study_id = study.id
        deliveries.enqueue(
            session,
            study_id=study_id,
            study_version=version,
            destination="PACS",
            kind="sr",
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            path=path,
        )


def _row(sessions: sessionmaker[Session]) -> Export:
    with sessions() as session:
        return session.execute(select(Export)).scalar_one()


def test_delivery_re_armed_during_its_send_is_sent_again(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """The study is re-processed while version 1 is on the wire: version 2 (same SR
    UID, new file) must not be marked delivered by version 1's Success."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    v1 = _result(exporter.store, "v1", uid)
    v2 = _result(exporter.store, "v2", uid)
    _queue(sessions, 1, v1, uid)
    destination.during_store = lambda: _queue(sessions, 2, v2, uid)

    assert exporter.run_once() == 1
    row = _row(sessions)
    assert (row.state, row.path, row.study_version, row.attempts) == (
        ExportState.PENDING,
        v2,
        2,
        0,
    )

    destination.during_store = lambda: None
    assert exporter.run_once() == 1
    row = _row(sessions)
    assert (row.state, row.path, row.attempts) == (ExportState.DELIVERED, v2, 1)
    assert destination.received == [uid, uid]


def test_admin_retry_during_a_failing_attempt_is_kept(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Nothing listens on the port; an admin re-arms the delivery while the attempt
    runs: the re-arm (attempts 0, due now) stands, not the attempt's backoff."""
    exporter = _exporter(tmp_path, sessions, free_port())
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    send = exporter._send

    def send_then_retry(*args: object, **kwargs: object) -> object:
        results = send(*args, **kwargs)  # type: ignore[arg-type]
        with sessions.begin() as session:
            assert deliveries.retry(session, _row(sessions).id)
        return results

    exporter._send = send_then_retry  # type: ignore[method-assign,assignment]
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts, row.last_error) == (ExportState.PENDING, 0, None)


def test_full_disk_while_de_identifying_is_retried_not_failed(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    destination: Destination,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = _exporter(tmp_path, sessions, destination.port, deidentify=True)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)

    def no_space(self: Deidentifier, source: Path, target: Path) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Deidentifier, "deidentify_file", no_space)
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts) == (ExportState.PENDING, 1)
    assert row.last_error is not None and "No space left" in row.last_error

    monkeypatch.undo()
    with sessions.begin() as session:
        session.get_one(Export, row.id).next_attempt_at = utcnow()
    exporter.run_once()
    assert _row(sessions).state == ExportState.DELIVERED
    assert len(destination.received) == 1 and destination.received[0] != uid  # pseudonymised


def test_missing_result_file_fails_for_good(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    exporter = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, "results/gone.dcm", uid)
    exporter.run_once()
    row = _row(sessions)
    assert row.state == ExportState.FAILED and "FileNotFoundError" in (row.last_error or "")
    assert destination.received == []


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),
        (0xA700, Outcome.TEMPORARY),
        (0x0213, Outcome.TEMPORARY),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
    ],
)
def test_status_classes(code: int, outcome: Outcome) -> None:
    assert classify(code) is outcome
