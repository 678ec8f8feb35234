"""The event-driven acceptor threads: same DICOM behaviour as pynetdicom's, no polling.

Peers are real: a pynetdicom requestor in this process and raw TCP sockets.
"""

from __future__ import annotations

import hashlib
import inspect
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import (  # type: ignore[attr-defined,unused-ignore]
    CTImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.ingest import reactor
from node.ingest.reactor import Doorbell, EventDrivenAssociation, EventDrivenRequestHandler

#: The upstream code the node copies with one change, as reviewed: the loops whose
#: sleeps node/ingest/reactor.py made waits, and the socket check node/dicom_socket.py
#: made poll(). A pynetdicom upgrade that changes any of it fails here: compare the new
#: code with the node's copy, carry the change over, then update the digest.
REVIEWED = {
    DULServiceProvider.run_reactor: "e3a10eb3a0931e48",  # pragma: allowlist secret
    DULServiceProvider.__init__: "c82dafa9438ddf70",  # pragma: allowlist secret
    Association._run_reactor: "f28838c5559e462a",  # pragma: allowlist secret
    RequestHandler._create_association: "05c8d12b79863cdb",  # pragma: allowlist secret
    AssociationSocket.ready.fget: "3eb58e3d39dc076d",  # pragma: allowlist secret
}


@pytest.mark.parametrize("function", list(REVIEWED), ids=lambda f: f.__qualname__)
def test_upstream_loops_are_the_ones_reviewed(function: Callable[..., Any]) -> None:
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == REVIEWED[function], (
        f"pynetdicom's {function.__qualname__} changed: review the node's copy of it"
    )


def test_doorbell_wakes_a_select_and_outlives_its_close() -> None:
    bell = Doorbell()
    assert select.select([bell], [], [], 0)[0] == []
    for _ in range(100_000):  # more rings than the pipe holds: never blocks
        bell.ring()
    assert select.select([bell], [], [], 0)[0] == [bell]
    bell.drain()
    assert select.select([bell], [], [], 0)[0] == []
    threading.Timer(0.05, bell.ring).start()
    assert select.select([bell], [], [], 10)[0] == [bell]
    bell.close()
    bell.ring()  # a late ring from another thread is harmless
    bell.drain()


class _Acceptor:
    def __init__(self, network_timeout: float | None = 60) -> None:
        self.stored: list[str] = []
        self.associations: list[Association] = []
        self.thread_errors: list[BaseException] = []
        self.ae = AE(ae_title="ACCEPTOR")
        self.ae.network_timeout = network_timeout
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        self.server = self.ae.make_server(
            ("127.0.0.1", 0),
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_CONN_OPEN, lambda event: self.associations.append(event.assoc)),
            ],
            request_handler=EventDrivenRequestHandler,
        )
        self.ae._servers.append(self.server)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        self.stored.append(str(request.AffectedSOPInstanceUID))
        return 0x0000

    def requestor(self) -> Association:
        scu = AE(ae_title="REQUESTOR")
        scu.add_requested_context(Verification)
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", self.port, ae_title="ACCEPTOR")
        assert assoc.is_established
        return assoc


@pytest.fixture
def acceptor() -> Iterator[_Acceptor]:
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value or RuntimeError())
    server = _Acceptor()
    server.thread_errors = errors
    try:
        yield server
    finally:
        server.ae.shutdown()
        time.sleep(0.2)  # let the aborted threads finish before the hook goes back
        threading.excepthook = previous
        assert errors == [], f"exceptions in association threads: {errors!r}"


def _ct() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "X"
    return ds


def _ended(assoc: Association, within: float = 5.0) -> bool:
    """The association's threads ran and stopped (EVT_CONN_OPEN comes before start())."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        started = assoc.ident is not None
        if started and not assoc.is_alive() and not assoc.dul.is_alive():
            return True
        time.sleep(0.01)
    return False


def test_echo_store_and_release(acceptor: _Acceptor) -> None:
    assoc = acceptor.requestor()
    sent = [_ct() for _ in range(20)]
    assert assoc.send_c_echo().Status == 0x0000
    for ds in sent:
        assert assoc.send_c_store(ds).Status == 0x0000
    assert acceptor.stored == [str(ds.SOPInstanceUID) for ds in sent]
    assoc.release()
    assert assoc.is_released
    (accepted,) = acceptor.associations
    assert isinstance(accepted, EventDrivenAssociation)
    assert _ended(accepted), "the acceptor's threads outlived the release"


def test_peer_abort_ends_the_association(acceptor: _Acceptor) -> None:
    assoc = acceptor.requestor()
    assert assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    (accepted,) = acceptor.associations
    assert _ended(accepted)
    assert accepted.is_aborted


def test_connection_dropped_before_associating_frees_its_slot_at_once(acceptor: _Acceptor) -> None:
    with socket.create_connection(("127.0.0.1", acceptor.port)):
        deadline = time.monotonic() + 5
        while not acceptor.associations and time.monotonic() < deadline:
            time.sleep(0.01)
    (accepted,) = acceptor.associations
    # Upstream's acceptor thread would wait out its ACSE timeout (30 s here) for an
    # A-ASSOCIATE-RQ that cannot come, holding an association slot: a load balancer's
    # port check every few seconds could fill maximum_associations.
    assert accepted.acse_timeout == 30
    assert _ended(accepted, within=5)
    assert accepted.dul.state_machine.current_state == "Sta1"
    assert not acceptor.ae.active_associations


def test_shutdown_beside_a_connection_that_never_asks_to_associate(
    acceptor: _Acceptor,
) -> None:
    """AE.shutdown() aborts every association; one still waiting for its A-ASSOCIATE-RQ
    (PS3.8 Sta2) has none to abort. Upstream's state machine raised in the DUL thread."""
    silent = socket.create_connection(("127.0.0.1", acceptor.port))
    try:
        deadline = time.monotonic() + 5
        while not acceptor.associations and time.monotonic() < deadline:
            time.sleep(0.01)
        (accepted,) = acceptor.associations
        while accepted.dul.state_machine.current_state != "Sta2" and time.monotonic() < deadline:
            time.sleep(0.01)  # the DUL comes up and waits in Sta2
        assert accepted.dul.state_machine.current_state == "Sta2"
        acceptor.ae.shutdown()
        assert _ended(accepted)
        assert accepted.dul.state_machine.current_state == "Sta1"
        assert acceptor.thread_errors == []
    finally:
        silent.close()


def test_network_timeout_still_aborts_an_idle_association() -> None:
    """Timers are seen by the capped wait, not by events: an idle peer is still dropped."""
    assert reactor.POLL_SECONDS < 0.3
    server = _Acceptor(network_timeout=0.3)
    try:
        assoc = server.requestor()
        (accepted,) = server.associations
        assert accepted.dul._idle_timer.timeout == 0.3
        assert accepted.dul.artim_timer.timeout == server.ae.acse_timeout
        assert _ended(accepted, within=10)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not assoc.is_established
    finally:
        server.ae.shutdown()
