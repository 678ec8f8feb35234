"""The exporter's bookkeeping around a real C-STORE: what is recorded after an attempt.

The destination is a pynetdicom storage SCP in this process; the exporter sends to
it over TCP as it would to a PACS. Both database backends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    JPEG2000MC,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, build_context, evt
from pynetdicom.presentation import PresentationContext
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import config
from node.config import Settings
from node.db.models import Export, ExportState, Study, StudyStatus
from node.db.types import utcnow
from node.deid import Deidentifier
from node.export import deliveries
from node.export.exporter import Exporter
from node.export.scu import Delivery, Item, Outcome, classify, send
from node.storage import InstanceStore
from node.verification import c_echo
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT, ct_instance
from tests.nodes import free_port


@dataclass
class Destination:
    """A storage SCP recording what arrives; ``during_store`` runs inside each C-STORE."""

    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    #: (transfer syntax the object came in, its pixels) per C-STORE.
    pixels: list[tuple[str, Any]] = field(default_factory=list)
    during_store: Callable[[], object] = lambda: None
    #: The C-STORE status it answers.
    status: int = 0x0000
    #: Associations the SCU aborted (A-ABORT).
    aborted: int = 0
    #: Every data set received, as received.
    datasets: list[Dataset] = field(default_factory=list)
    #: The Error Comment it answers with ``status``, if any.
    error_comment: str | None = None

    def on_store(self, event: evt.Event) -> int | Dataset:
        self.during_store()
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.pixels.append((str(event.context.transfer_syntax), ds.pixel_array))
        self.datasets.append(ds)
        if self.error_comment is None:
            return self.status
        answer = Dataset()
        answer.Status = self.status
        answer.ErrorComment = self.error_comment
        return answer

    def on_abort(self, event: evt.Event) -> None:
        self.aborted += 1


@pytest.fixture
def start_destination(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Destination]]:
    """``start_destination(contexts=..., require_called_aet=False)``: a running SCP.

    It takes only ``contexts``: a node started earlier in this process sets pynetdicom's
    process-wide UNRESTRICTED_STORAGE_SERVICE (accept any storage class), switched off
    here for the test's duration.
    """
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    servers: list[Any] = []

    def _start(
        contexts: Sequence[PresentationContext] = AllStoragePresentationContexts,
        *,
        require_called_aet: bool = False,
    ) -> Destination:
        peer = Destination()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = list(contexts)
        ae.require_called_aet = require_called_aet
        servers.append(
            ae.start_server(
                ("127.0.0.1", peer.port),
                block=False,
                evt_handlers=[
                    (evt.EVT_C_STORE, peer.on_store),
                    (evt.EVT_ABORTED, peer.on_abort),
                ],
            )
        )
        return peer

    yield _start
    for server in servers:
        server.shutdown()


@pytest.fixture
def destination(start_destination: Callable[..., Destination]) -> Destination:
    return start_destination()


def _exporter(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    port: int,
    *,
    deidentify: bool = False,
    **destination: Any,
) -> Exporter:
    cfg = node_config(tmp_path)
    cfg["destinations"] = [
        {"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": port}
        | ({"deidentify": True} if deidentify else {})
        | destination
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


def _queue(
    sessions: sessionmaker[Session],
    version: int,
    path: str,
    uid: str,
    *,
    sop_class: str = CTImageStorage,
    destination: str = "PACS",
) -> None:
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
            destination=destination,
            kind="sr",
            sop_instance_uid=uid,
            sop_class_uid=sop_class,
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
        (0x0110, Outcome.TEMPORARY),
        (0xA900, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
    ],
)
def test_status_classes(code: int, outcome: Outcome) -> None:
    assert classify(code) is outcome


def _due_now(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        session.get_one(Export, _row(sessions).id).next_attempt_at = utcnow()


def test_processing_failure_is_retried_then_given_up_after_its_bound(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """0x0110 from a PACS is often transient (its database busy, a full spool): retried
    with the backoff, but failed for good after export.max_processing_failures answers."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    exporter.settings.export.max_processing_failures = 3
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    destination.status = 0x0110
    for attempt in (1, 2):
        assert exporter.run_once() == 1
        row = _row(sessions)
        assert (row.state, row.attempts, row.last_status) == (ExportState.PENDING, attempt, 0x0110)
        assert row.next_attempt_at is not None and row.next_attempt_at > utcnow()
        assert f"0x0110 (processing failure) {attempt} of 3 in a row" in (row.last_error or "")
        _due_now(sessions)
    assert exporter.run_once() == 1
    row = _row(sessions)
    assert (row.state, row.attempts, row.next_attempt_at) == (ExportState.FAILED, 3, None)
    assert (row.last_error or "").startswith("gave up after 3 answers 0x0110 in a row")
    assert exporter.run_once() == 0
    assert len(destination.received) == 3


def test_processing_failure_streak_restarts_after_another_answer(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """Only answers 0x0110 in a row count; a transient 0x0110 then Success is delivered."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    exporter.settings.export.max_processing_failures = 2
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    for status in (0x0110, 0xA700, 0x0110):
        destination.status = status
        exporter.run_once()
        assert _row(sessions).state == ExportState.PENDING, hex(status)
        _due_now(sessions)
    destination.status = 0x0000
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts, row.last_error) == (ExportState.DELIVERED, 4, None)


def test_destination_down_past_its_retry_window_gives_up(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Nothing listens; past ``retry_for_seconds`` the delivery fails, and stays failed."""
    exporter = _exporter(tmp_path, sessions, free_port(), retry_for_seconds=0.001)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    assert exporter.run_once() == 1
    row = _row(sessions)
    assert row.state == ExportState.FAILED and row.next_attempt_at is None
    assert (row.last_error or "").startswith("gave up after 1 attempts: no association")
    assert exporter.run_once() == 0


def test_association_rejected_is_retried(
    tmp_path: Path, sessions: sessionmaker[Session], start_destination: Callable[..., Destination]
) -> None:
    """The PACS refuses our called AE title (a configuration slip on either side): the
    delivery waits for the fix instead of failing."""
    peer = start_destination(require_called_aet=True)
    exporter = _exporter(tmp_path, sessions, peer.port, ae_title="NOTPACS")
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts, row.last_error) == (
        ExportState.PENDING,
        1,
        "association rejected",
    )
    assert row.next_attempt_at is not None and peer.received == []


def test_sop_class_the_destination_does_not_take_fails_for_good(
    tmp_path: Path, sessions: sessionmaker[Session], start_destination: Callable[..., Destination]
) -> None:
    mr_only = [build_context(MRImageStorage)]
    peer = start_destination(mr_only)
    exporter = _exporter(tmp_path, sessions, peer.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)  # a CT
    exporter.run_once()
    row = _row(sessions)
    assert row.state == ExportState.FAILED and peer.received == []
    assert f"does not accept SOP class {CTImageStorage}" in (row.last_error or "")


def test_compressed_object_goes_uncompressed_to_a_destination_that_takes_only_that(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
) -> None:
    """An RLE original (send_original) to a PACS that accepts MR only in explicit or
    implicit little endian: decompressed on the way, same instance, same pixels."""
    source = shared_data / "dicom/transfer-syntaxes/rle-lossless__MR_small_RLE.dcm"
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    peer = start_destination([build_context(MRImageStorage, uncompressed)])
    exporter = _exporter(tmp_path, sessions, peer.port)
    original = dcmread(source)
    rel = "instances/original.dcm"
    shutil.copyfile(source, exporter.store.path(rel))
    uid = str(original.SOPInstanceUID)
    _queue(sessions, 1, rel, uid, sop_class=MRImageStorage)
    exporter.run_once()
    assert _row(sessions).state == ExportState.DELIVERED
    assert peer.received == [uid]
    ((syntax, pixels),) = peer.pixels
    assert syntax in uncompressed
    assert np.array_equal(pixels, original.pixel_array)


def test_destination_removed_from_the_configuration_fails_its_deliveries(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    exporter = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid, destination="GONE")
    exporter.run_once()
    row = _row(sessions)
    assert row.state == ExportState.FAILED
    assert row.last_error == "destination 'GONE' is not configured"


def test_backoff_stays_at_its_cap_however_many_attempts() -> None:
    """2 ** 1024 overflows a float: the 1025th attempt of a long retry raised."""
    now = utcnow()
    for attempts in (1, 10, 1023, 1024, 1025, 10_000):
        export = Export(attempts=attempts, retry_started_at=now)
        deliveries.record(
            cast(Session, None),
            export,
            Delivery(Outcome.TEMPORARY, None, "no association"),
            retry_for=timedelta(days=30),
            initial_backoff=5.0,
            max_backoff=60.0,
        )
        assert export.next_attempt_at is not None
        expected = 10.0 if attempts == 1 else 60.0  # 5 s doubled once, else the cap
        assert abs((export.next_attempt_at - now).total_seconds() - expected) < 5


def test_a_destination_that_never_answers_the_connect_is_given_up_on_in_time(
    tmp_path: Path,
) -> None:
    """A PACS behind a firewall that drops SYNs: pynetdicom's connect waited for the OS
    (about two minutes), whatever export.timeout_seconds said."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped, as by a firewall
        filler = socket.socket()
        filler.settimeout(0.5)
        with contextlib.suppress(OSError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    path = tmp_path / "ct.dcm"
    ds = ct_instance(generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1)
    ds.save_as(path, enforce_file_format=True)
    destination = config.Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    try:
        started = time.monotonic()
        [outcome] = send(
            destination,
            [Item(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))],
            calling_ae_title="TRIAGE",
            timeout=2.0,
        )
        assert outcome.outcome is Outcome.TEMPORARY
        assert time.monotonic() - started < 30, "the connect was not bounded by the timeout"
        started = time.monotonic()
        echo = c_echo("127.0.0.1", port, called_ae_title="PACS", calling_ae_title="T", timeout=2)
        assert not echo.ok and time.monotonic() - started < 30
    finally:
        for s in (*fillers, listener):
            s.close()


def _originals(exporter: Exporter, sessions: sessionmaker[Session], *files: Path) -> list[str]:
    """``files`` queued as originals of one study (copied into the store as received)."""
    uids = []
    for index, source in enumerate(files):
        ds = dcmread(source, stop_before_pixels=True)
        rel = f"instances/original-{index}.dcm"
        exporter.store.path(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, exporter.store.path(rel))
        uid = str(ds.SOPInstanceUID)
        _queue(sessions, 1, rel, uid, sop_class=str(ds.SOPClassUID))
        uids.append(uid)
    return uids


def test_compressed_originals_go_in_their_own_syntax_where_the_destination_takes_it(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
) -> None:
    """One context per SOP class listing every syntax let the PACS pick one for all:
    it preferred Implicit VR, so a JPEG 2000 and an RLE MR both went decompressed
    (lossy pixels inflated), though it took both compressed syntaxes."""
    syntaxes = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000, RLELossless]
    peer = start_destination([build_context(MRImageStorage, syntaxes)])
    exporter = _exporter(tmp_path, sessions, peer.port)
    folder = shared_data / "dicom/transfer-syntaxes"
    uids = _originals(
        exporter,
        sessions,
        folder / "jpeg2000__MR2_J2KI.dcm",
        folder / "rle-lossless__MR_small_RLE.dcm",
    )
    exporter.run_once()
    with sessions() as session:
        states = set(session.scalars(select(Export.state)))
    assert states == {ExportState.DELIVERED}
    assert peer.received == uids
    assert [syntax for syntax, _ in peer.pixels] == [JPEG2000, RLELossless]


def test_big_endian_original_the_destination_refuses_fails_once_with_the_reason(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
) -> None:
    """Explicit VR Big Endian (retired) to a PACS taking MR in little endian only:
    pynetdicom found no context and every attempt failed "send failed: ValueError",
    retried for a day. Its OW/UN values cannot be converted safely: failed for good."""
    peer = start_destination(
        [build_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    )
    exporter = _exporter(tmp_path, sessions, peer.port)
    source = shared_data / "dicom/transfer-syntaxes/explicit-vr-big-endian__MR_small_expb.dcm"
    _originals(exporter, sessions, source)
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts, peer.received) == (ExportState.FAILED, 1, [])
    assert "does not accept SOP class" in (row.last_error or "")
    assert "Explicit VR Big Endian" in (row.last_error or "")
    assert deliveries.refused_for_good(row.state, row.last_status, row.last_error)


def test_more_than_128_contexts_go_over_several_associations(
    tmp_path: Path, start_destination: Callable[..., Destination]
) -> None:
    """PS3.8 allows 128 presentation contexts per association: objects of 130 SOP
    classes were cut to the first 128 classes and the rest failed as "not accepted"."""
    peer = start_destination(AllStoragePresentationContexts)
    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts][:130]
    items = []
    for index, sop_class in enumerate(classes):
        ds = ct_instance(generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items.append(Item(path, sop_class, str(ds.SOPInstanceUID)))
    destination = config.Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=peer.port)
    outcomes = send(destination, items, calling_ae_title="TRIAGE", timeout=10.0)
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * len(items), {
        o.detail for o in outcomes
    }
    assert peer.received == [item.sop_instance_uid for item in items]


def test_two_exporters_never_send_one_delivery_at_once(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """Two node processes on one database (a second dicom role, a restart overlapping
    the old process) each read the due deliveries and both sent them: a delivery is
    claimed before its send, and the other exporter leaves it alone."""
    first = _exporter(tmp_path, sessions, destination.port)
    second = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(first.store, "v1", uid), uid)
    # The first is still on the wire when the second looks for due deliveries.
    destination.during_store = lambda: time.sleep(1.5)
    attempted: list[int] = []
    threads = [
        threading.Thread(target=lambda e=e: attempted.append(e.run_once())) for e in (first, second)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(attempted) == [0, 1]
    assert destination.received == [uid]
    row = _row(sessions)
    assert (row.state, row.attempts) == (ExportState.DELIVERED, 1)


def _rows(sessions: sessionmaker[Session]) -> list[Export]:
    with sessions() as session:
        return list(session.scalars(select(Export).order_by(Export.id)))


def test_objects_behind_one_the_destination_never_answers_go_on_the_next_cycle(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """The PACS hangs on one object: the DIMSE timeout aborts the association, and the
    objects behind it failed "send failed: RuntimeError" unsent, backed off with it,
    and met it first again on every later attempt."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    exporter.settings.export.timeout_seconds = 1.0
    uids = [generate_uid(prefix=TEST_ROOT) for _ in range(2)]
    for index, uid in enumerate(uids):
        _queue(sessions, 1, _result(exporter.store, f"r{index}", uid), uid)
    calls: list[int] = []

    def hang_on_the_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.5)

    destination.during_store = hang_on_the_first
    assert exporter.run_once() == 2
    hung, behind = _rows(sessions)
    assert (hung.state, hung.attempts, hung.last_error) == (
        ExportState.PENDING,
        1,
        "no response (timeout or abort)",
    )
    assert (behind.state, behind.attempts) == (ExportState.PENDING, 0)
    assert exporter.run_once() == 1
    hung, behind = _rows(sessions)
    assert (behind.state, behind.attempts) == (ExportState.DELIVERED, 1)
    assert hung.state == ExportState.PENDING and hung.attempts == 1


def test_stopping_aborts_the_association_and_leaves_the_rest_due(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """Node shutdown while a batch is on the wire: the exporter went on sending the
    whole batch (and was cut off without an A-ABORT past the 30 s join). Now it aborts
    before the next object; those not sent are due at once, no attempt counted."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    uids = [generate_uid(prefix=TEST_ROOT) for _ in range(3)]
    for index, uid in enumerate(uids):
        _queue(sessions, 1, _result(exporter.store, f"r{index}", uid), uid)
    destination.during_store = exporter.stop
    assert exporter.run_once() == 3
    assert destination.received == uids[:1]
    first, *rest = _rows(sessions)
    assert first.state == ExportState.DELIVERED
    now = utcnow()
    for row in rest:
        assert (row.state, row.attempts, row.last_error) == (ExportState.PENDING, 0, None)
        assert row.next_attempt_at is not None and row.next_attempt_at <= now
    deadline = time.monotonic() + 5
    while destination.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert destination.aborted == 1


@pytest.mark.parametrize(
    ("status", "state", "meaning"),
    [
        (0xB007, ExportState.DELIVERED, "Data Set Does Not Match SOP Class"),
        (0xB000, ExportState.DELIVERED, "Coercion of Data Elements"),
        (0xA900, ExportState.FAILED, "Data Set Does Not Match SOP Class"),
    ],
)
def test_warning_or_failure_keeps_the_destinations_meaning_and_comment_out_of_the_log(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    destination: Destination,
    caplog: pytest.LogCaptureFixture,
    status: int,
    state: ExportState,
    meaning: str,
) -> None:
    """A Warning was recorded as a bare status the study page does not show (it shows
    last_error, empty on delivery), and the PACS's Error Comment, which says what it
    coerced or why it refused, was dropped. The comment may name the patient: kept on
    the delivery, never logged."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    destination.status = status
    destination.error_comment = "PatientID PID-4711 coerced to PID-0815"
    with caplog.at_level(logging.DEBUG):
        exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.last_status, row.attempts) == (state, status, 1)
    assert row.last_error == (
        f'C-STORE status 0x{status:04X} ({meaning}); Error Comment "{destination.error_comment}"'
    )
    assert "PID-4711" not in caplog.text


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("jpeg-baseline__JPEGBaseline_1s_1f_u_08_08.dcm", "ISO_10918_1"),
        ("jpeg-ls-near-lossless__CT1_JLSN.dcm", "ISO_14495_1"),
    ],
)
def test_lossy_original_decompressed_for_a_destination_stays_marked_lossy(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
    name: str,
    method: str,
) -> None:
    """A lossy original without Lossy Image Compression (a modality that left it out),
    decompressed for a PACS taking only little endian: the transfer syntax was the only
    sign of the lossy pixels, and they arrived looking lossless. PS3.3 C.7.6.1.1.5."""
    source = dcmread(shared_data / "dicom/transfer-syntaxes" / name)
    del source.LossyImageCompression
    if "LossyImageCompressionMethod" in source:
        del source.LossyImageCompressionMethod
    path = tmp_path / "lossy.dcm"
    source.save_as(path, enforce_file_format=True)
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    peer = start_destination([build_context(str(source.SOPClassUID), uncompressed)])
    exporter = _exporter(tmp_path, sessions, peer.port)
    _originals(exporter, sessions, path)
    exporter.run_once()
    assert _row(sessions).state == ExportState.DELIVERED
    (received,) = peer.datasets
    assert received.file_meta.TransferSyntaxUID in uncompressed
    assert (received.LossyImageCompression, received.LossyImageCompressionMethod) == ("01", method)
    assert np.array_equal(received.pixel_array, source.pixel_array)


def test_ybr_jpeg_original_arrives_as_rgb_pixels_still_marked_lossy(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
) -> None:
    """JPEG baseline YBR_FULL_422 (a 120-frame ultrasound) to a PACS taking only little
    endian: decoded to RGB, interleaved, Lossy Image Compression kept "01"."""
    source = shared_data / "dicom/modalities/multi-frame/color3d_jpeg_baseline.dcm"
    original = dcmread(source)
    peer = start_destination([build_context(str(original.SOPClassUID), [ExplicitVRLittleEndian])])
    exporter = _exporter(tmp_path, sessions, peer.port)
    _originals(exporter, sessions, source)
    exporter.run_once()
    assert _row(sessions).state == ExportState.DELIVERED
    (received,) = peer.datasets
    assert (
        received.PhotometricInterpretation,
        received.PlanarConfiguration,
        received.LossyImageCompression,
        received.SOPInstanceUID,
    ) == ("RGB", 0, "01", original.SOPInstanceUID)
    assert np.array_equal(received.pixel_array, original.pixel_array)


def test_original_no_decoder_here_can_decompress_fails_once_with_the_reason(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    start_destination: Callable[..., Destination],
    shared_data: Path,
) -> None:
    """A syntax pydicom has no decoder for (JPEG 2000 Part 2), to a PACS taking only
    uncompressed: failed at once, saying so, not retried for the whole window."""
    source = dcmread(shared_data / "dicom/transfer-syntaxes/jpeg2000__MR2_J2KI.dcm")
    source.file_meta.TransferSyntaxUID = JPEG2000MC
    path = tmp_path / "part2.dcm"
    source.save_as(path, enforce_file_format=True)
    peer = start_destination(
        [build_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    )
    exporter = _exporter(tmp_path, sessions, peer.port)
    _originals(exporter, sessions, path)
    exporter.run_once()
    row = _row(sessions)
    assert (row.state, row.attempts, row.next_attempt_at, peer.received) == (
        ExportState.FAILED,
        1,
        None,
        [],
    )
    assert (row.last_error or "").startswith(
        "cannot decompress JPEG 2000 Part 2 Multi-component Image Compression"
    )


def test_admin_retry_of_a_delivered_object_sends_it_again(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """``exports retry`` on a delivered object (the PACS lost it) sends it again; while
    pending it showed its old delivery time next to "pending"."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    uid = generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "v1", uid), uid)
    exporter.run_once()
    row = _row(sessions)
    assert row.state == ExportState.DELIVERED
    with sessions.begin() as session:
        assert deliveries.retry(session, row.id)
        assert not deliveries.retry(session, row.id + 1000)
    row = _row(sessions)
    assert (row.state, row.attempts, row.delivered_at) == (ExportState.PENDING, 0, None)
    assert exporter.run_once() == 1
    assert _row(sessions).state == ExportState.DELIVERED
    assert destination.received == [uid, uid]


def test_claim_of_a_node_killed_mid_send_lapses_within_a_few_timeouts(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """The claim was sized for the longest batch (twice the timeout per object): a node
    killed while sending 10 objects left them unsent for 24 timeouts after its restart."""
    exporter = _exporter(tmp_path, sessions, destination.port)
    exporter.settings.export.timeout_seconds = 10.0
    for index in range(10):
        uid = generate_uid(prefix=TEST_ROOT)
        _queue(sessions, 1, _result(exporter.store, f"r{index}", uid), uid)

    def killed(*args: object, **kwargs: object) -> list[Delivery]:
        raise SystemExit("killed mid-send")

    exporter._send = killed  # type: ignore[method-assign,assignment]
    with pytest.raises(SystemExit):
        exporter.run_once()
    latest = utcnow() + timedelta(seconds=4 * 10.0 + 5)
    for row in _rows(sessions):
        assert row.state == ExportState.PENDING and row.attempts == 0
        assert row.next_attempt_at is not None and row.next_attempt_at <= latest


def test_claim_is_kept_ahead_of_a_batch_longer_than_it(
    tmp_path: Path, sessions: sessionmaker[Session], destination: Destination
) -> None:
    """A batch outlasting the first lease (4 timeouts): the claim is renewed before each
    object, so a second exporter polling all along takes none of it."""
    first = _exporter(tmp_path, sessions, destination.port)
    second = _exporter(tmp_path, sessions, destination.port)
    first.settings.export.timeout_seconds = second.settings.export.timeout_seconds = 1.0
    uids = [generate_uid(prefix=TEST_ROOT) for _ in range(8)]
    for index, uid in enumerate(uids):
        _queue(sessions, 1, _result(first.store, f"r{index}", uid), uid)
    destination.during_store = lambda: time.sleep(0.7)  # 8 x 0.7 s > 4 s
    sending = threading.Thread(target=first.run_once)
    sending.start()
    deadline = time.monotonic() + 10
    while not destination.received and time.monotonic() < deadline:
        time.sleep(0.02)  # the first has claimed them and is sending
    taken = 0
    while sending.is_alive():
        taken += second.run_once()
        time.sleep(0.2)
    sending.join()
    assert taken == 0
    assert destination.received == uids
    assert {row.state for row in _rows(sessions)} == {ExportState.DELIVERED}


def test_sop_class_refused_among_others_fails_alone_and_the_rest_go(
    tmp_path: Path, sessions: sessionmaker[Session], start_destination: Callable[..., Destination]
) -> None:
    peer = start_destination([build_context(MRImageStorage)])
    exporter = _exporter(tmp_path, sessions, peer.port)
    ct_uid, mr_uid = generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT)
    _queue(sessions, 1, _result(exporter.store, "ct", ct_uid), ct_uid)
    mr = _result(exporter.store, "mr", mr_uid)
    ds = dcmread(exporter.store.path(mr))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(exporter.store.path(mr), enforce_file_format=True)
    _queue(sessions, 1, mr, mr_uid, sop_class=MRImageStorage)
    assert exporter.run_once() == 2
    ct, delivered = _rows(sessions)
    assert (ct.state, ct.attempts, ct.last_status) == (ExportState.FAILED, 1, None)
    assert (
        ct.last_error
        == f"destination does not accept SOP class {CTImageStorage} (CT Image Storage)"
    )
    assert delivered.state == ExportState.DELIVERED and peer.received == [mr_uid]
