"""Fuzzing the DICOM path: malformed data sets through C-STORE, garbage on the port.

One node serves the whole module. Each example is sent as a raw C-STORE data set
(the bytes on the wire exactly as generated) by an allowed caller; then a canary
association stores a valid instance. For every example the node answers a status
or aborts, never hangs; Success only for bytes that were stored and parse whole;
anything refused has a quarantine record; the canary keeps succeeding.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined,unused-ignore]
from sqlalchemy import func, select

from node.config import Settings
from node.db.models import Instance, QuarantinedInstance
from node.ingest import status
from node.runtime import Node
from tests.conftest import node_config
from tests.dicomgen import TEST_ROOT, ct_instance

#: The node's limits in this module: small, so that "huge" is reachable quickly.
MAX_INSTANCE = 1_048_576
NETWORK_TIMEOUT = 3.0
#: A socket read waiting this long for the node means it hangs.
PATIENCE = 60.0

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
]
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


# -- the node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = node_config(
        tmp,
        dicom={
            "allowed_callers": ["FUZZER@127.0.0.1", "CANARY@127.0.0.1", "ECHOSCU@127.0.0.1"],
            "max_instance_bytes": MAX_INSTANCE,
            "max_pdu_size": 65_536,
            "acse_timeout": NETWORK_TIMEOUT,
            "network_timeout": NETWORK_TIMEOUT,
            "dimse_timeout": 30,
            "max_associations_per_caller": 4,
        },
        storage={"fsync": False},
    )
    started = Node(Settings.model_validate(cfg))
    started.start()
    yield started
    started.stop()


# -- sending ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no response
    aborted_by_node: bool  # the node sent A-ABORT or closed the connection


def c_store_raw(
    port: int, body: bytes, *, sop_class: str, sop_instance: str, tsuid: str, aet: str = "FUZZER"
) -> Outcome:
    """C-STORE ``body`` as the data set, unchanged, on a context with ``tsuid``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = tsuid
    aborted = threading.Event()

    def on_acse(event: evt.Event) -> None:
        if isinstance(event.primitive, A_ABORT | A_P_ABORT):
            aborted.set()

    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = PATIENCE
    ae.add_requested_context(sop_class, [tsuid])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.dcm"
        buf = BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
        path.write_bytes(buf.getvalue() + body)
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = ae.associate(
                "127.0.0.1", port, ae_title="TRIAGE", evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)]
            )
            assert assoc.is_established, "the fuzzer's association was refused"
            code: int | None = None
            try:
                rsp = assoc.send_c_store(path)
                code = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            except (RuntimeError, OSError):
                code = None
            finally:
                if assoc.is_established:
                    assoc.release()
            closed = not assoc.is_established and code is None
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            ae.shutdown()
    return Outcome(code, aborted.is_set() or closed)


def canary(port: int) -> None:
    """A valid instance from another caller is stored while the fuzzing goes on."""
    ds = ct_instance(generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1, size=8)
    ae = AE(ae_title="CANARY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = PATIENCE
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established, "the canary association was refused"
    try:
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == status.SUCCESS, f"canary got 0x{rsp.get('Status', 0xFFFF):04X}"
    finally:
        assoc.release()
        ae.shutdown()


# -- data sets --------------------------------------------------------------------------


def fresh_uid() -> str:
    """A new UID of fixed length: the encoded data set's size must not vary between runs
    of one example, or hypothesis cannot replay it."""
    return f"{TEST_ROOT}9{uuid.uuid4().int % 10**30:030d}"


def base_dataset() -> Dataset:
    """A small valid CT instance with a sequence, so there is structure to break."""
    ds = ct_instance(fresh_uid(), fresh_uid(), 1, size=16, sop_instance_uid=fresh_uid())
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = fresh_uid()
    ds.ReferencedImageSequence = [item, item]
    return ds


def encode(ds: Dataset, tsuid: str) -> bytes:
    """The data set bytes (no file meta) in ``tsuid``'s encoding (native TSs only)."""
    ds.file_meta.TransferSyntaxUID = tsuid
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    meta_length = struct.unpack("<I", data[140:144])[0]
    return data[144 + meta_length :]


@dataclass(frozen=True)
class Case:
    kind: str
    body: bytes
    tsuid: str  # the one negotiated (and declared in the file meta)
    sop_class: str
    sop_instance: str

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"Case({self.kind}, {len(self.body)} bytes, {self.tsuid})"


def elements(body: bytes) -> list[tuple[int, int, bool]]:
    """(start, value offset, long-length form) of each top-level Explicit VR LE element."""
    out = []
    for raw in data_element_generator(BytesIO(body), False, True, defer_size=1):
        long_form = raw.VR is not None and raw.VR.encode() in LONG_VRS
        start = raw.value_tell - (12 if long_form else 8)
        out.append((start, raw.value_tell, long_form))
    return out


def nested_sequences(depth: int, items: int) -> bytes:
    """A private SQ nested ``depth`` deep, ``items`` items wide at the top, undefined lengths."""
    sq = struct.pack("<HH", 0x0009, 0x1010) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 4) + b"FUZZ"
    inner = b""
    for _ in range(depth):
        inner = sq + item + inner + item_end + seq_end
    wide = sq + (item + item_end) * items + seq_end
    return creator + (inner if depth else b"") + (wide if items else b"")


@st.composite
def cases(draw: st.DrawFn) -> Case:
    ds = base_dataset()
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    body = encode(ds, ExplicitVRLittleEndian)
    kind = draw(
        st.sampled_from(
            [
                "bytes",
                "truncate",
                "insert",
                "length",
                "vr",
                "sequences",
                "pixels",
                "syntax",
                "uids",
            ]
        )
    )
    tsuid = ExplicitVRLittleEndian
    if kind == "bytes":
        data = bytearray(body)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        body = bytes(data)
    elif kind == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif kind == "insert":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=64)) + body[at:]
    elif kind in ("length", "vr"):
        start, value, long_form = draw(st.sampled_from(elements(body)))
        data = bytearray(body)
        if kind == "length":
            lie = draw(
                st.one_of(
                    st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(body)]),
                    st.integers(0, 0xFFFFFFFF),
                )
            )
            if long_form:
                data[value - 4 : value] = struct.pack("<I", lie)
            else:
                data[value - 2 : value] = struct.pack("<H", lie & 0xFFFF)
        else:
            vr = draw(
                st.one_of(
                    st.sampled_from([b"SQ", b"UN", b"OB", b"US", b"UL", b"FD", b"AT", b"DA"]),
                    st.binary(min_size=2, max_size=2),
                )
            )
            data[start + 4 : start + 6] = vr
        body = bytes(data)
    elif kind == "sequences":
        depth = draw(st.one_of(st.integers(0, 50), st.sampled_from([500, 3000, 20000])))
        items = draw(st.one_of(st.integers(0, 100), st.sampled_from([10_000, 70_000])))
        body = (
            elements_before(body, 0x00090010)
            + nested_sequences(depth, items)
            + (elements_after(body, 0x00090010))
        )
    elif kind == "pixels":
        ds.Rows = draw(st.sampled_from([0, 1, 16, 17, 4000, 65535]))
        ds.Columns = draw(st.sampled_from([0, 1, 16, 4000, 65535]))
        ds.BitsAllocated = draw(st.sampled_from([1, 8, 12, 16, 32, 64]))
        ds.SamplesPerPixel = draw(st.sampled_from([1, 3, 4]))
        if draw(st.booleans()):
            frames = draw(st.sampled_from(["0", "1", "3", "1A", "-1", "99999"]))
            # pydicom will not hold "1A" as IS; as SH the bytes on the wire are the same.
            ds.add_new(0x00280008, "IS" if frames != "1A" else "SH", frames)
        ds.PixelData = draw(st.sampled_from([b"", b"\x00", b"\x00" * 511, b"\x00" * 512]))
        body = encode(ds, ExplicitVRLittleEndian)
    elif kind == "syntax":
        written = draw(st.sampled_from([ImplicitVRLittleEndian, ExplicitVRBigEndian]))
        body = encode(ds, written)
        declared = [t for t in TRANSFER_SYNTAXES if t != written]
        tsuid = draw(st.sampled_from(declared))
    else:  # "uids": the request's UIDs disagree with the data set's, or are not UIDs
        sop_class = draw(st.sampled_from([sop_class, "1.2.840.10008.5.1.4.1.1.7"]))
        sop_instance = draw(st.sampled_from([sop_instance, fresh_uid(), "1.2.3.04"]))
    return Case(kind, body, tsuid, sop_class, sop_instance)


def elements_before(body: bytes, tag: int) -> bytes:
    """The elements of ``body`` whose tags sort before ``tag``."""
    for start, _, _ in elements(body):
        group, element = struct.unpack("<HH", body[start : start + 4])
        if (group << 16 | element) >= tag:
            return body[:start]
    return body


def elements_after(body: bytes, tag: int) -> bytes:
    return body[len(elements_before(body, tag)) :]


# -- checks -----------------------------------------------------------------------------


def quarantined(node: Node) -> int:
    with node.sessions() as session:
        return int(session.execute(select(func.count()).select_from(QuarantinedInstance)).scalar())


def stored_path(node: Node, sop_instance: str) -> Path | None:
    with node.sessions() as session:
        rel = session.execute(
            select(Instance.path).where(Instance.sop_instance_uid == sop_instance)
        ).scalar_one_or_none()
    return None if rel is None else node.store.data_dir / rel


def parses_whole(path: Path) -> None:
    """Every element of a stored instance reads, nested ones included."""
    ds = dcmread(path)
    for elem in ds.iterall():
        _ = elem.value


def listener_alive(node: Node) -> bool:
    names = {t.name for t in threading.enumerate() if t.is_alive()}
    return "dicom-scp" in names


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_malformed_data_sets_are_answered_or_aborted(node: Node, case: Case) -> None:
    before = quarantined(node)
    outcome = c_store_raw(
        node.dicom.port,
        case.body,
        sop_class=case.sop_class,
        sop_instance=case.sop_instance,
        tsuid=case.tsuid,
    )
    assert outcome.status is not None or outcome.aborted_by_node, "no answer and no abort"
    answer = "abort" if outcome.status is None else f"0x{outcome.status:04X}"
    event(f"{case.kind} -> {answer}")  # pytest --hypothesis-show-statistics
    path = stored_path(node, case.sop_instance)
    if outcome.status == status.SUCCESS:
        assert case.kind != "syntax", "accepted a data set its transfer syntax misdescribes"
        assert path is not None, "Success but nothing stored"
        assert path.read_bytes().endswith(case.body), "stored bytes differ from those sent"
        parses_whole(path)
    else:
        assert path is None, f"stored although answered {outcome}"
        if outcome.status is not None:
            assert status.is_failure(outcome.status), f"0x{outcome.status:04X}"
        assert quarantined(node) > before, f"refused without a quarantine record: {outcome}"
    canary(node.dicom.port)
    assert listener_alive(node)


# -- garbage on the port ----------------------------------------------------------------


def associate_rq_bytes() -> bytes:
    """A real A-ASSOCIATE-RQ as pynetdicom sends it (captured on a local socket)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        ae = AE(ae_title="FUZZER")
        ae.acse_timeout = ae.network_timeout = 2
        ae.add_requested_context(Verification)
        thread = threading.Thread(target=ae.associate, args=("127.0.0.1", port), daemon=True)
        thread.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(PATIENCE)
            header = _recv_exactly(conn, 6)
            body = _recv_exactly(conn, struct.unpack(">I", header[2:6])[0])
        thread.join(PATIENCE)
        ae.shutdown()
    return header + body


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return data


def closed_by_node(payload: bytes, port: int, *, half_close: bool) -> bool:
    """Send ``payload``; True once the node closes the connection (False: still open)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(PATIENCE)
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            return False
    return True


@pytest.fixture(scope="module")
def associate_rq() -> bytes:
    return associate_rq_bytes()


P_DATA = bytes.fromhex("04000000000c000000080103000000000000")


@pytest.mark.parametrize(
    "name,payload",
    [
        ("p-data before association", P_DATA),
        ("lying length 0xFFFFFFFF", b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 1024),
        ("unknown pdu type", b"\x09\x00\x00\x00\x00\x04abcd"),
        ("release before association", bytes.fromhex("05000000000400000000")),
        ("abort before association", bytes.fromhex("07000000000400000000")),
        ("header only", b"\x01\x00"),
    ],
)
def test_garbage_pdus_are_closed(node: Node, name: str, payload: bytes) -> None:
    """Kept open by the peer (no half-close): the node itself ends the connection."""
    assert closed_by_node(payload, node.dicom.port, half_close=False), name
    canary(node.dicom.port)


def test_truncated_associate_request_is_closed(node: Node, associate_rq: bytes) -> None:
    for cut in (1, 6, 10, len(associate_rq) // 2, len(associate_rq) - 1):
        assert closed_by_node(associate_rq[:cut], node.dicom.port, half_close=False), cut
    canary(node.dicom.port)


def test_a_stalled_connection_does_not_stop_others(node: Node, associate_rq: bytes) -> None:
    """While a caller sits in the middle of a PDU, other callers are served."""
    with socket.create_connection(("127.0.0.1", node.dicom.port)) as stalled:
        stalled.sendall(associate_rq[:20])
        canary(node.dicom.port)
        canary(node.dicom.port)


@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_random_bytes_and_mutated_associate_requests(
    node: Node, associate_rq: bytes, data: Any
) -> None:
    if data.draw(st.booleans(), label="mutate a real A-ASSOCIATE-RQ"):
        payload = bytearray(associate_rq)
        for _ in range(data.draw(st.integers(1, 6))):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    else:
        payload = bytearray(data.draw(st.binary(min_size=1, max_size=2048)))
    assert closed_by_node(bytes(payload), node.dicom.port, half_close=True)
    canary(node.dicom.port)
    assert listener_alive(node)


def drive_malformed_associations(node: Node, associate_rq: bytes) -> None:
    """Associations that end every way but a clean release, from the FUZZER caller.

    Each one leaves per-association state in the node while it lasts (a caller slot,
    a tally, a message size count); the test below checks it is all gone afterwards.
    """
    port = node.dicom.port
    ds = base_dataset()
    body = encode(ds, ExplicitVRLittleEndian)
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    # A truncated data set: answered with a failure status (and quarantined).
    refused = c_store_raw(
        port,
        body[:-9],
        sop_class=sop_class,
        sop_instance=sop_instance,
        tsuid=ExplicitVRLittleEndian,
    )
    assert refused.status is not None and status.is_failure(refused.status), refused
    # A data set past max_instance_bytes: the node aborts while it is still arriving.
    huge = body + b"\x00" * (MAX_INSTANCE + 65_536)
    oversized = c_store_raw(
        port, huge, sop_class=sop_class, sop_instance=fresh_uid(), tsuid=ExplicitVRLittleEndian
    )
    assert oversized.status != status.SUCCESS and (
        oversized.aborted_by_node or status.is_failure(oversized.status or 0)
    ), oversized
    # An association accepted, then the connection dropped without release or abort.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(PATIENCE)
            sock.sendall(associate_rq)
            assert _recv_exactly(sock, 1) == b"\x02", "A-ASSOCIATE-AC expected"
    # Garbage after a half-sent request, and a PDU that makes no sense before association.
    assert closed_by_node(associate_rq[: len(associate_rq) // 2], port, half_close=True)
    assert closed_by_node(P_DATA, port, half_close=False)
    canary(port)


def test_no_association_state_leaks(node: Node, associate_rq: bytes) -> None:
    """After associations that ended badly, the node holds nothing for any of them.

    Drives its own malformed associations first, so it proves something when run alone.
    """
    import time

    drive_malformed_associations(node, associate_rq)
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if not node.dicom.ae.active_associations and not node.scp._tallies:
            break
        time.sleep(0.2)
    assert node.dicom.ae.active_associations == []
    assert node.scp._tallies == {}
    assert node.scp._slots.held("FUZZER") == 0 and node.scp._slots.held("CANARY") == 0
    assert node.scp._sizes._received == {}
    assert listener_alive(node)
