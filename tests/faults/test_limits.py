"""Limits of the DICOM listener: associations per caller and in all, instance size,
back-pressure from the pipeline backlog, and the ACSE/network timeouts.

Every refusal is checked from the caller's side (what a modality sees) and in the
node (nothing stored, a record kept, the listener still serving).
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined,unused-ignore]
from sqlalchemy import func, select, update

from node.config import Destination
from node.db.models import Instance, QuarantinedInstance, StudyStatus
from node.db.models import Study as StudyRow
from node.export import scu
from node.export.scu import Item
from node.ingest import status
from node.runtime import Node
from node.verification import c_echo
from tests.dicomgen import TEST_ROOT, ct_instance, write_series
from tests.peers import echoscu, raw_store, split_part10, storescu, storescu_responses
from tests.unit.pipeline.studies import queued_study

#: Generous bound for "eventually": a loaded 2-core machine, never a timing assertion.
PATIENCE = 60.0


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae


def _associate(node: Node, title: str) -> Association:
    return _ae(title).associate("127.0.0.1", node.dicom.port, ae_title="TRIAGE")


def _rejection(assoc: Association) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    return (int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))


LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def _eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"not within {PATIENCE} s: {what}"
        time.sleep(0.1)


def _held(node: Node, title: str) -> int:
    return node.scp._slots.held(title)


def _instance(size: int = 32) -> Dataset:
    study = generate_uid(prefix=TEST_ROOT)
    return ct_instance(study, generate_uid(prefix=TEST_ROOT), 1, size=size)


def _store(node: Node, ds: Dataset, title: str = "STORESCU") -> Dataset:
    assoc = _associate(node, title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()


def _echo(node: Node, title: str = "ECHOSCU") -> bool:
    assoc = _associate(node, title)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().get("Status") == status.SUCCESS
    assoc.release()
    return bool(ok)


def _stored(node: Node) -> set[str]:
    with node.sessions() as session:
        return set(session.execute(select(Instance.sop_instance_uid)).scalars())


# -- associations -----------------------------------------------------------------------


def test_per_caller_limit_rejects_the_extra_association_and_frees_slots(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(dicom={"max_associations_per_caller": 2, "maximum_associations": 10})
    first, second = _associate(node, "STORESCU"), _associate(node, "STORESCU")
    assert first.is_established and second.is_established

    third = _associate(node, "STORESCU")
    assert _rejection(third) == LOCAL_LIMIT_EXCEEDED
    other = _associate(node, "ECHOSCU")  # another caller is not affected
    assert other.is_established
    assert other.send_c_echo().Status == status.SUCCESS
    other.release()

    first.release()  # released: a slot is free again
    _eventually(lambda: _held(node, "STORESCU") == 1, "slot freed on release")
    again = _associate(node, "STORESCU")
    assert again.is_established
    again.abort()  # aborted: freed too
    _eventually(lambda: _held(node, "STORESCU") == 1, "slot freed on abort")

    # The connection just drops (no release, no abort): freed when the node sees it close.
    sock = second.dul.socket
    assert sock is not None and sock.socket is not None
    sock.socket.shutdown(socket.SHUT_RDWR)
    _eventually(lambda: _held(node, "STORESCU") == 0, "slot freed on connection close")
    second.kill()
    fresh = [_associate(node, "STORESCU") for _ in range(2)]
    assert all(a.is_established for a in fresh)
    for a in fresh:
        a.release()


def test_maximum_associations_rejects_and_leaks_no_caller_slot(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(dicom={"max_associations_per_caller": 3, "maximum_associations": 2})
    held = [_associate(node, "STORESCU"), _associate(node, "ECHOSCU")]
    assert all(a.is_established for a in held)
    refused = _associate(node, "STORESCU")
    assert _rejection(refused) == LOCAL_LIMIT_EXCEEDED
    for a in held:
        a.release()
    # The refused association was counted for STORESCU before pynetdicom refused it;
    # it must not hold a slot now.
    _eventually(lambda: _held(node, "STORESCU") == 0, "no slot held after the refusal")
    # pynetdicom counts an association against maximum_associations until its thread
    # ends, a few ms after the requestor saw the A-RELEASE-RP.
    _eventually(lambda: not node.dicom.ae.active_associations, "released threads ended")
    again = [_associate(node, "STORESCU"), _associate(node, "STORESCU")]
    assert all(a.is_established for a in again)
    for a in again:
        a.release()


# -- instance size ----------------------------------------------------------------------


def test_instance_over_max_instance_bytes_aborts_and_stores_nothing(
    start_node: Callable[..., Node],
) -> None:
    # 512x512x16 bits: 512 KiB of pixel data against a 128 KiB limit, in 16 KiB PDUs.
    node = start_node(dicom={"max_instance_bytes": 131_072, "max_pdu_size": 16_384})
    big = _instance(size=512)
    assoc = _associate(node, "STORESCU")
    assert assoc.is_established
    assoc.send_c_store(big)
    _eventually(lambda: assoc.is_aborted or not assoc.is_alive(), "the node aborts")
    assert not assoc.is_established

    assert big.SOPInstanceUID not in _stored(node)
    with node.sessions() as session:
        refusals = session.execute(select(QuarantinedInstance)).scalars().all()
    assert [r.status for r in refusals] == [status.OUT_OF_RESOURCES_DISK]
    assert "max_instance_bytes" in refusals[0].reason
    assert refusals[0].sop_instance_uid == big.SOPInstanceUID
    assert refusals[0].path.endswith(".json")
    kept = list(node.store.quarantine_dir.iterdir())
    assert [p.suffix for p in kept] == [".json"], "no partial instance bytes are written"
    assert list((node.store.data_dir / "instances").rglob("*.dcm")) == []

    small = _instance(size=32)  # the listener still serves
    assert _store(node, small).Status == status.SUCCESS
    assert small.SOPInstanceUID in _stored(node)


def test_handler_refuses_instance_just_over_the_limit(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A data set under the limit whose stored form (with file meta) is over it: 0xA700."""
    ds = _instance(size=32)
    path = tmp_path / "edge.dcm"
    ds.save_as(path, enforce_file_format=True)
    _, body = split_part10(path.read_bytes())
    node = start_node(dicom={"max_instance_bytes": len(body) + 8})
    sent = raw_store(node.dicom.port, path)
    assert sent.status == status.OUT_OF_RESOURCES_DISK
    assert ds.SOPInstanceUID not in _stored(node)
    with node.sessions() as session:
        reasons = session.execute(select(QuarantinedInstance.reason)).scalars().all()
    assert len(reasons) == 1 and "max_instance_bytes" in reasons[0]


# -- back-pressure ----------------------------------------------------------------------


def test_backlog_over_limit_answers_a702_until_it_drains(
    start_node: Callable[..., Node],
) -> None:
    node = start_node(pipeline={"workers": 0, "max_backlog_studies": 1})
    backlog_uid = generate_uid(prefix=TEST_ROOT)
    queued_study(node.sessions, backlog_uid, ["pneumonia-triage"])

    refused: list[str] = []

    def refused_now() -> bool:
        ds = _instance()
        rsp = _store(node, ds)
        if rsp.Status == status.OUT_OF_RESOURCES_BACKLOG:
            assert "backlog" in str(rsp.get("ErrorComment", ""))
            refused.append(ds.SOPInstanceUID)
            return True
        assert rsp.Status == status.SUCCESS
        return False

    # The gauge may still hold the count read before the study was queued (≈1 s).
    _eventually(refused_now, "0xA702 while one study is queued")
    assert not set(refused) & _stored(node), "nothing refused was stored"

    with node.sessions.begin() as session:
        session.execute(
            update(StudyRow)
            .where(StudyRow.study_instance_uid == backlog_uid)
            .values(status=StudyStatus.DONE)
        )
    accepted: list[str] = []

    def accepted_now() -> bool:
        ds = _instance()
        rsp = _store(node, ds)
        if rsp.Status == status.SUCCESS:
            accepted.append(ds.SOPInstanceUID)
            return True
        assert rsp.Status == status.OUT_OF_RESOURCES_BACKLOG
        return False

    _eventually(accepted_now, "Success once the backlog drained")
    assert set(accepted) <= _stored(node)


# -- timeouts ---------------------------------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    """Read until the node closes the connection; False if it is still open after PATIENCE."""
    sock.settimeout(PATIENCE)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.fixture
def quick_node(start_node: Callable[..., Node]) -> Node:
    return start_node(dicom={"acse_timeout": 1, "dimse_timeout": 2, "network_timeout": 2})


def test_connection_without_associate_request_is_closed_after_acse_timeout(
    quick_node: Node,
) -> None:
    with socket.create_connection(("127.0.0.1", quick_node.dicom.port)) as sock:
        assert _closed_by_peer(sock)


def test_half_sent_pdu_header_is_closed_after_network_timeout(quick_node: Node) -> None:
    """The reactor blocks inside the read; only the socket's own timeout ends it."""
    with socket.create_connection(("127.0.0.1", quick_node.dicom.port)) as sock:
        sock.sendall(b"\x01\x00\x00")
        assert _closed_by_peer(sock)
    with socket.create_connection(("127.0.0.1", quick_node.dicom.port)) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x10\x00" + b"\x00" * 8)  # 8 of 4096 body bytes
        assert _closed_by_peer(sock)
    assert _echo(quick_node), "the listener still serves"


def test_idle_association_is_aborted(quick_node: Node) -> None:
    assoc = _associate(quick_node, "STORESCU")
    assert assoc.is_established
    _eventually(lambda: not assoc.is_established, "idle association ends")
    assert assoc.is_aborted
    _eventually(lambda: _held(quick_node, "STORESCU") == 0, "its slot is freed")


def test_connections_on_descriptors_above_1024_are_served(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A busy node may hold more than 1024 descriptors; ``select()`` cannot watch those.

    Open files held in this (the node's) process push every new socket above
    1100: the listener's accepted ones (DCMTK, in its own process, is the
    modality) and the node's own outgoing ones (a C-ECHO check, an export).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    node = start_node(dicom={"allowed_callers": ["ECHOSCU", "STORESCU", "TRIAGE"]})
    _, files = write_series(tmp_path / "series", 4)
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        assert echoscu(node.dicom.port).returncode == 0
        sent = storescu(node.dicom.port, files[:3])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert [s for _, s in storescu_responses(sent.stdout + sent.stderr)] == ["Success"] * 3

        port = node.dicom.port
        check = c_echo("127.0.0.1", port, called_ae_title="TRIAGE", calling_ae_title="TRIAGE")
        assert check.ok, check.detail
        last = dcmread(files[3], stop_before_pixels=True)
        destination = Destination(name="self", ae_title="TRIAGE", host="127.0.0.1", port=port)
        item = Item(files[3], str(last.SOPClassUID), str(last.SOPInstanceUID))
        deliveries = scu.send(destination, [item], calling_ae_title="TRIAGE", timeout=30)
        assert [d.outcome for d in deliveries] == [scu.Outcome.DELIVERED]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
