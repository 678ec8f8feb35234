"""Limits on what callers may ask of the listener, and back-pressure from the pipeline.

The SCP must stay up for everyone when one caller misbehaves: too many
associations, an instance larger than the node will hold, a PDU header whose
length lies, a connection that never speaks, or a pipeline too far behind.
Each limit here refuses early and cheaply, with the DICOM answer the standard
has for it (PS3.8 9.3.4 A-ASSOCIATE-RJ "local-limit-exceeded", PS3.4 B.2.3
0xA7xx "out of resources").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import DicomSettings
from node.db.models import Study, StudyStatus
from node.dicom_socket import PollingAssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Room above the negotiated maximum PDU length for PDU and PDV headers.
_PDU_SLACK = 64 * 1024
#: Largest PDU taken before an association exists (A-ASSOCIATE-RQ with user identity).
_ASSOCIATE_RQ_LIMIT = 1024 * 1024
#: The bound for the default dicom.max_pdu_size (4 MiB).
_DEFAULT_PDU_LIMIT = 4_194_304 + _PDU_SLACK


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """The listener's limits, from ``[dicom]``; defaults mean "as configured by default"."""

    #: Associations at once from one calling AE title; 0: no own limit.
    max_associations_per_caller: int = 8
    #: Largest instance (as it would be stored, file meta included).
    max_instance_bytes: int = 2_147_483_648
    #: Largest PDU read from a caller; a longer PDU header closes the connection.
    max_pdu_bytes: int = _DEFAULT_PDU_LIMIT
    #: Seconds a socket read may wait for bytes inside a PDU.
    network_timeout: float = 120.0

    @classmethod
    def from_settings(cls, dicom: DicomSettings) -> IngestLimits:
        # max_pdu_size 0 means "unlimited" in the negotiation; an instance's size still bounds it.
        negotiated = dicom.max_pdu_size or dicom.max_instance_bytes
        return cls(
            max_associations_per_caller=dicom.max_associations_per_caller,
            max_instance_bytes=dicom.max_instance_bytes,
            max_pdu_bytes=max(negotiated + _PDU_SLACK, _ASSOCIATE_RQ_LIMIT),
            network_timeout=dicom.network_timeout,
        )


class CallerSlots:
    """Active associations per calling AE title, counted once and released once.

    An association is released by whichever of released/aborted/rejected/
    connection-closed comes first; associations whose thread has ended are
    pruned at the next admission too, so a missed event cannot leak a slot.
    """

    def __init__(self, per_caller: int) -> None:
        self._per_caller = per_caller
        self._lock = threading.Lock()
        self._active: dict[int, tuple[str, Association]] = {}

    def acquire(self, assoc: Association, calling_ae_title: str) -> bool:
        """Count ``assoc`` for its caller; False (nothing counted) if over the limit."""
        with self._lock:
            self._prune()
            if self._per_caller > 0:
                held = sum(1 for title, _ in self._active.values() if title == calling_ae_title)
                if held >= self._per_caller:
                    return False
            self._active[id(assoc)] = (calling_ae_title, assoc)
            return True

    def release(self, assoc: Association) -> None:
        with self._lock:
            self._active.pop(id(assoc), None)

    def held(self, calling_ae_title: str) -> int:
        with self._lock:
            self._prune()
            return sum(1 for title, _ in self._active.values() if title == calling_ae_title)

    def _prune(self) -> None:
        dead = [key for key, (_, assoc) in self._active.items() if _ended(assoc)]
        for key in dead:
            del self._active[key]


def _ended(assoc: Association) -> bool:
    # An association counted in EVT_REQUESTED runs in its own (started) thread.
    return assoc.ident is not None and not assoc.is_alive()


#: Marks an association already refused for size.
_REFUSED = -1


class MessageSizeWatch:
    """Data set bytes of the DIMSE message each association is receiving (PS3.8 E.2).

    Fed every P-DATA-TF PDU before pynetdicom appends it to its buffer, so a
    message over the limit is refused after at most one more PDU, not buffered whole.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._received: dict[int, int] = {}

    def add(self, assoc: Association, values: list[bytes]) -> int | None:
        """Count the PDVs of one PDU; the message's size, once, when it goes over the limit.

        After that the association is being aborted: later PDUs are not counted again.
        """
        key = id(assoc)
        with self._lock:
            size = self._received.get(key, 0)
            if size == _REFUSED:
                return None
            over: int | None = None
            for value in values:
                if not value:
                    continue
                header = value[0]
                if header & 0x01:  # command fragment: the data set follows
                    continue
                size += len(value) - 1
                if size > self._limit:
                    over = size
                if header & 0x02:  # last data set fragment: the next message starts at 0
                    size = 0
            self._received[key] = _REFUSED if over is not None else size
            return over

    def forget(self, assoc: Association) -> None:
        with self._lock:
            self._received.pop(id(assoc), None)


class BoundedAssociationSocket(PollingAssociationSocket):
    """An association socket that will not read a PDU longer than ``max_pdu_bytes``.

    pynetdicom reads a PDU's whole declared length into memory before decoding
    it; a header declaring 0xFFFFFFFF bytes would make any peer, even one that
    is not allowed to associate, cost gigabytes. Refusing the read makes the
    DUL see a short PDU and close the connection (PS3.8 9.2, Evt17).
    """

    max_pdu_bytes: int = _DEFAULT_PDU_LIMIT

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_bytes:
            log.warning(
                "connection closed address=%s reason=PDU of %d bytes exceeds %d",
                self.assoc.requestor.address,
                nr_bytes,
                self.max_pdu_bytes,
            )
            return bytearray()
        return self._recv_exactly(nr_bytes)

    def _recv_exactly(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closes), straight into one buffer.

        Upstream reads in 4 KiB ``recv`` calls appended to a growing bytearray: a
        512 KiB CT image took 128 reads, each a poll and a recv on a socket with a
        timeout. Here the kernel fills the final buffer in as few reads as it can.
        """
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        received = 0
        with memoryview(buffer) as view:
            while received < nr_bytes:
                with view[received:] as rest:
                    count = sock.recv_into(rest)
                if not count:
                    break  # the peer closed: return what came, as upstream does
                received += count
        if received < nr_bytes:
            del buffer[received:]
        return buffer


def bound_socket(assoc: Association, limits: IngestLimits) -> None:
    """Give an accepted connection a read timeout and a PDU size bound.

    Called from EVT_CONN_OPEN, before the association's reactor reads anything.
    Without a timeout a peer that sends half a PDU header and then nothing holds
    its thread (and an association slot) forever: the network idle timer is only
    checked between PDUs, never inside a blocking read.
    """
    sock = assoc.dul.socket
    if sock is None:
        return
    if sock.socket is not None:
        sock.socket.settimeout(limits.network_timeout)
    # The socket is pynetdicom's; only its read method changes, so swap the class.
    sock.__class__ = BoundedAssociationSocket
    assert isinstance(sock, BoundedAssociationSocket)
    sock.max_pdu_bytes = limits.max_pdu_bytes


def count_backlog(sessions: sessionmaker[Session]) -> Callable[[], int]:
    """A function counting the studies queued or processing (indexed on status)."""
    statement = (
        select(func.count())
        .select_from(Study)
        .where(Study.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]))
    )

    def count() -> int:
        with sessions() as session:
            return int(session.execute(statement).scalar_one())

    return count


class BacklogGauge:
    """Whether the pipeline is too far behind to take more instances.

    The count is read at most once per ``ttl`` seconds, by one thread while the
    others use the last value, so the C-STORE hot path pays no query per instance.
    If the count cannot be read the last known value stands: a database fault
    shows up where the instance is recorded (0xA701), not here.
    """

    def __init__(
        self,
        limit: int,
        count: Callable[[], int],
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._count = count
        self._ttl = ttl
        self._clock = clock
        self._value = 0
        self._read_at: float | None = None
        self._refreshing = threading.Lock()

    def backlog(self) -> int:
        now = self._clock()
        stale = self._read_at is None or now - self._read_at >= self._ttl
        if stale and self._refreshing.acquire(blocking=self._read_at is None):
            try:
                self._value = self._count()
            except SQLAlchemyError as exc:
                log.error("cannot count the pipeline backlog error=%s", type(exc).__name__)
            finally:
                self._read_at = now
                self._refreshing.release()
        return self._value

    def over_limit(self) -> bool:
        return self.limit > 0 and self.backlog() >= self.limit
