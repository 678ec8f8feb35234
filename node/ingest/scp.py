"""The DICOM listener: C-ECHO and C-STORE SCP for every storage SOP class (pynetdicom).

Handlers do one thing each and return a status; the C-STORE handler follows
PS3.4 B.2.3: the instance is on disk and in the catalogue before Success goes out.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, TypeVar, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined,unused-ignore]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node import tls
from node.catalog import Catalog, Recorded
from node.config import DicomSettings
from node.errors import NodeError, OutOfResources, RejectedInstance
from node.ingest import part10, status
from node.ingest.callers import CallerPolicy
from node.ingest.inspect import InstanceHeader, inspect_instance
from node.ingest.limits import (
    BacklogGauge,
    CallerSlots,
    IngestLimits,
    MessageSizeWatch,
    bound_socket,
)
from node.ingest.reactor import EventDrivenRequestHandler
from node.observability import metrics
from node.storage import InstanceStore, StagedFile, StoredFile, digest

log = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide settings that keep PHI out of logs and accept private storage classes.

    pynetdicom logs C-FIND/C-MOVE identifiers by default; they hold patient data.
    pydicom warns with element values on invalid input; we validate ourselves.
    """
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # Vendors send private SOP classes; a node in front of PACS must take them too.
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


class NoDelayAssociationServer(ThreadedAssociationServer):
    """Accepted sockets get TCP_NODELAY: without it every small PDU waits for an ACK."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


class TlsAssociationServer(NoDelayAssociationServer):
    """The DICOM TLS listener (PS3.15 B.2): the handshake runs in the connection's thread.

    pynetdicom's own ``ssl_context`` wraps accepted sockets in the accept loop, so
    one caller that connects and never speaks would stall every other TLS caller.
    Here the accept loop only accepts; each connection's thread does the
    handshake, bounded by the ACSE timeout, and a failed one is logged and closed.
    """

    tls_context: ssl.SSLContext
    handshake_timeout: float

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        assert isinstance(request, socket.socket)
        address = client_address[0] if isinstance(client_address, tuple) else client_address
        try:
            request.settimeout(self.handshake_timeout)
            secured = self.tls_context.wrap_socket(request, server_side=True)
            secured.settimeout(None)
        except (OSError, ValueError) as exc:
            reason = tls.describe(exc) if isinstance(exc, OSError) else str(exc)
            log.warning("TLS connection refused address=%s reason=%s", address, reason)
            self.shutdown_request(request)
            return
        log.debug("TLS connection address=%s version=%s", address, secured.version())
        super().process_request_thread(secured, client_address)


class _UidLocks:
    """Striped locks so two associations storing the same SOP Instance serialise."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def __call__(self, uid: str) -> threading.Lock:
        return self._locks[zlib.crc32(uid.encode()) % len(self._locks)]


@dataclass
class _AssociationTally:
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


@dataclass
class StoreSCP:
    """The C-STORE/C-ECHO service: event handlers bound to a store and a catalogue."""

    store: InstanceStore
    catalog: Catalog
    callers: CallerPolicy
    limits: IngestLimits = field(default_factory=IngestLimits)
    #: Back-pressure from the pipeline; None: never refuse for backlog.
    backlog: BacklogGauge | None = None
    _locks: _UidLocks = field(default_factory=_UidLocks)
    _tallies: dict[int, _AssociationTally] = field(default_factory=dict)
    #: Writes instance files while association threads run the catalogue statements.
    _writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-write")
    )

    def __post_init__(self) -> None:
        self._slots = CallerSlots(self.limits.max_associations_per_caller)
        self._sizes = MessageSizeWatch(self.limits.max_instance_bytes)

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self.on_connection_open),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_PDU_RECV, self.on_pdu),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_finished),
            (evt.EVT_ABORTED, self.on_finished),
            (evt.EVT_REJECTED, self.on_finished),
            (evt.EVT_CONN_CLOSE, self.on_finished),
            *metrics.association_handlers(),  # after on_requested: it reads is_rejected
        ]

    # -- association ----------------------------------------------------------------
    def on_connection_open(self, event: evt.Event) -> None:
        bound_socket(event.assoc, self.limits)

    def on_requested(self, event: evt.Event) -> None:
        """Reject unknown callers before negotiation (PS3.8 9.3.4: calling AE not recognised)."""
        requestor = event.assoc.requestor
        # The requestor's ae_title is only filled in during negotiation; read the request.
        primitive = requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
        if not self.callers.admits(calling, requestor.address):
            log.warning(
                "association rejected calling_ae=%s address=%s reason=calling AE not allowed",
                calling,
                requestor.address,
            )
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()
            return
        if not self._slots.acquire(event.assoc, calling):
            log.warning(
                "association rejected calling_ae=%s address=%s reason=more than %d "
                "associations from this caller",
                calling,
                requestor.address,
                self.limits.max_associations_per_caller,
            )
            # rejected-transient, service-provider (presentation), local-limit-exceeded
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()
            return
        log.info("association requested calling_ae=%s address=%s", calling, requestor.address)
        self._tallies[id(event.assoc)] = _AssociationTally()

    def on_pdu(self, event: evt.Event) -> None:
        """Abort an association whose DIMSE message grows past ``max_instance_bytes``.

        Checked per P-DATA-TF PDU as it arrives, so the instance is never buffered whole.
        """
        pdu = event.pdu
        if not isinstance(pdu, P_DATA_TF) or event.assoc.is_aborted:
            return  # PDUs still in flight after our A-ABORT are dropped by the DUL (Sta13)
        values = [item.presentation_data_value or b"" for item in pdu.presentation_data_value_items]
        size = self._sizes.add(event.assoc, values)
        if size is None:
            return
        sop_class, sop_instance = _command_uids(event.assoc)
        self._record_too_large(
            size, event.assoc.requestor.ae_title.strip(), sop_class, sop_instance
        )
        event.assoc.abort()  # in a notification handler: queued, sent by the reactor

    def on_finished(self, event: evt.Event) -> None:
        """Released, aborted, rejected or disconnected: whichever comes first frees the slot."""
        self._slots.release(event.assoc)
        self._sizes.forget(event.assoc)
        tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None:
            log.info(
                "association ended calling_ae=%s stored=%d duplicates=%d failed=%d",
                event.assoc.requestor.ae_title.strip(),
                tally.stored,
                tally.duplicates,
                tally.failed,
            )

    # -- services ---------------------------------------------------------------------
    def on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        """Persist the bytes as received, then acknowledge (PS3.4 B.2.3). Never raises."""
        tally = self._tallies.setdefault(id(event.assoc), _AssociationTally())
        calling = event.assoc.requestor.ae_title.strip()
        request = event.request
        assert isinstance(request, C_STORE)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        if self.backlog is not None and self.backlog.over_limit():
            tally.failed += 1
            metrics.INSTANCES.labels("rejected").inc()
            log.warning(
                "refused sop_instance_uid=%s reason=pipeline backlog of %d studies",
                sop_instance,
                self.backlog.backlog(),
            )
            return _refusal(
                OutOfResources(
                    status.OUT_OF_RESOURCES_BACKLOG,
                    "pipeline backlog over limit, retry later",
                    sop_instance,
                )
            )
        data = b""
        try:
            # What event.encoded_dataset(include_meta=True) gives, without encoding the
            # file meta afresh for every instance (node.ingest.part10).
            stream = cast(BytesIO, request.DataSet).getvalue()
            header = part10.file_header(sop_class, sop_instance, event.context.transfer_syntax)
            data = header + stream
            metrics.RECEIVED_BYTES.inc(len(data))
            if len(data) > self.limits.max_instance_bytes:
                tally.failed += 1
                metrics.INSTANCES.labels("rejected").inc()
                return _refusal(self._record_too_large(len(data), calling, sop_class, sop_instance))
            result = self._store(data, calling, sop_class, sop_instance)
        except Exception:
            # A bug must not take the listener down, nor lose the data: quarantine it.
            log.exception("unexpected error storing sop_instance_uid=%s", sop_instance)
            result = self._quarantine(
                data,
                RejectedInstance(status.INTERNAL_ERROR, "internal error", sop_instance),
                calling,
                sop_class,
                sop_instance,
            )
        if result == status.SUCCESS:
            tally.stored += 1
            metrics.INSTANCES.labels("stored").inc()
        elif result == _DUPLICATE:
            tally.duplicates += 1
            metrics.INSTANCES.labels("duplicate").inc()
            result = status.SUCCESS
        else:
            tally.failed += 1
            metrics.INSTANCES.labels("rejected").inc()
        return result

    def _store(self, data: bytes, calling: str, sop_class: str, sop_instance: str) -> int:
        try:
            self.store.ensure_space(len(data))
        except RejectedInstance as exc:
            log.warning("refused sop_instance_uid=%s reason=%s", sop_instance, exc.reason)
            return exc.status
        # The disk starts on the bytes now, and the checksum on another writer thread
        # (hashlib lets go of the GIL); the header check runs meanwhile, and the
        # catalogue statements after it overlap the disk (_write_and_record).
        staging = self._writer.submit(self.store.stage, data)
        checksum = self._writer.submit(digest, data)
        received = _Received(len(data), staging, checksum)
        try:
            return self._file(data, received, calling, sop_class, sop_instance)
        finally:
            # Never answer while the write still runs; bytes not placed are removed.
            self._settle(staging)

    def _file(
        self,
        data: bytes,
        received: _Received,
        calling: str,
        sop_class: str,
        sop_instance: str,
    ) -> int:
        try:
            header = inspect_instance(
                data, requested_sop_class_uid=sop_class, requested_sop_instance_uid=sop_instance
            )
        except RejectedInstance as exc:
            return self._quarantine(data, exc, calling, sop_class, sop_instance)

        with self._locks(header.sop_instance_uid):
            try:
                rel = self.store.instance_relpath(
                    header.study_instance_uid,
                    header.series_instance_uid,
                    header.sop_instance_uid,
                )
                recorded = self._write_and_record(rel, received, header, calling)
                if recorded.purged:
                    return self._restore(received, header)
                if not recorded.is_new:
                    log.info("duplicate sop_instance_uid=%s kept once", header.sop_instance_uid)
                    return _DUPLICATE
            except RejectedInstance as exc:
                log.warning(
                    "refused sop_instance_uid=%s reason=%s", header.sop_instance_uid, exc.reason
                )
                return exc.status
            except SQLAlchemyError as exc:
                # The file may be on disk without a row; the sender retries and it is replaced.
                log.error(
                    "database error sop_instance_uid=%s error=%s",
                    header.sop_instance_uid,
                    type(exc).__name__,
                )
                return status.OUT_OF_RESOURCES_DATABASE
            except NodeError as exc:
                log.error(
                    "storage error sop_instance_uid=%s error=%s", header.sop_instance_uid, exc
                )
                return status.OUT_OF_RESOURCES_DISK
        log.debug(
            "stored sop_instance_uid=%s study_uid=%s",
            header.sop_instance_uid,
            header.study_instance_uid,
        )
        return status.SUCCESS

    def _settle(self, staging: Future[StagedFile]) -> None:
        try:
            staged = staging.result()
        except NodeError:
            return  # the failed write cleaned up after itself; its error was answered
        self.store.discard(staged)

    def _write_and_record(
        self, rel: str, received: _Received, header: InstanceHeader, calling: str
    ) -> Recorded:
        """Catalogue the instance while its bytes are being staged; COMMIT last.

        One transaction looks the instance up first: a duplicate or a purged
        instance places nothing here. For a new one the INSERT and UPDATEs run
        while the writer thread makes the staged bytes durable; then the file is
        renamed into place and its directory fsynced, and only then COMMIT. So a
        committed row always has its file, Success goes out only after both, and
        the disk wait overlaps the header check and the SQL instead of adding up
        (bench/bench_ingest.py).
        """
        stored = received.stored_as(rel)

        def start_write() -> Callable[[], object]:
            return lambda: self.store.place(received.staging.result(), rel)

        return self.catalog.record_instance(header, stored, calling, start_write=start_write)

    def _restore(self, received: _Received, header: InstanceHeader) -> int:
        """Put a purged instance's file back under a new name; its row points at it."""
        uid = header.sop_instance_uid
        rel = self.store.restored_relpath(
            header.study_instance_uid, header.series_instance_uid, uid
        )
        restored = self.catalog.restore_purged(
            uid,
            received.stored_as(rel),
            place=lambda: self.store.place(received.staging.result(), rel),
        )
        if not restored:
            log.info("duplicate sop_instance_uid=%s restored meanwhile; kept once", uid)
            return _DUPLICATE
        log.info("purged sop_instance_uid=%s received again; file restored", uid)
        return status.SUCCESS

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _record_too_large(
        self, size: int, calling: str, sop_class: str, sop_instance: str
    ) -> OutOfResources:
        """Keep a record of a refused oversized instance: the reason, never its bytes."""
        exc = OutOfResources(
            status.OUT_OF_RESOURCES_DISK,
            f"instance of {size}+ bytes exceeds dicom.max_instance_bytes "
            f"({self.limits.max_instance_bytes})",
            sop_instance,
        )
        log.warning(
            "refused calling_ae=%s sop_instance_uid=%s status=0x%04X reason=%s",
            calling,
            sop_instance,
            exc.status,
            exc.reason,
        )
        record = {
            "calling_ae_title": calling,
            "sop_class_uid": sop_class,
            "sop_instance_uid": sop_instance,
            "status": exc.status,
            "reason": exc.reason,
            "size_bytes": size,
        }
        try:
            rel = _write_refusal(self.store, record)
            self.catalog.record_quarantine(
                calling_ae_title=calling,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                status=exc.status,
                reason=exc.reason,
                path=rel,
                size_bytes=size,
            )
        except (NodeError, SQLAlchemyError) as rexc:
            log.error("cannot record refusal sop_instance_uid=%s error=%s", sop_instance, rexc)
        return exc

    def _quarantine(
        self,
        data: bytes,
        exc: RejectedInstance,
        calling: str,
        sop_class: str,
        sop_instance: str,
    ) -> int:
        """Keep refused bytes with the reason; answer the rejection's status."""
        log.warning(
            "rejected sop_instance_uid=%s status=0x%04X reason=%s",
            sop_instance,
            exc.status,
            exc.reason,
        )
        record = {
            "calling_ae_title": calling,
            "sop_class_uid": sop_class,
            "sop_instance_uid": sop_instance,
            "status": exc.status,
            "reason": exc.reason,
        }
        try:
            rel = self.store.quarantine(data, record)
        except NodeError as qexc:
            log.error("cannot quarantine sop_instance_uid=%s error=%s", sop_instance, qexc)
            return status.OUT_OF_RESOURCES_DISK
        try:
            self.catalog.record_quarantine(
                calling_ae_title=calling,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                status=exc.status,
                reason=exc.reason,
                path=rel,
                size_bytes=len(data),
            )
        except SQLAlchemyError as dbexc:
            # The JSON sidecar next to the bytes still records the reason.
            log.error("cannot record quarantine in database error=%s", type(dbexc).__name__)
        return exc.status


@dataclass(frozen=True, slots=True)
class _Received:
    """One C-STORE's bytes while the writer pool stages them."""

    size_bytes: int
    staging: Future[StagedFile]
    checksum: Future[str]

    def stored_as(self, relative_path: str) -> StoredFile:
        """What the catalogue records (known without waiting for the disk)."""
        return StoredFile(relative_path, self.size_bytes, self.checksum.result())


#: Internal marker: stored before, answered as Success.
_DUPLICATE = -1


def _refusal(exc: RejectedInstance) -> Dataset:
    """A C-STORE response status with the reason as Error Comment (LO, 64 chars)."""
    response = Dataset()
    response.Status = exc.status
    response.ErrorComment = exc.reason[:64]
    return response


def _write_refusal(store: InstanceStore, record: dict[str, object]) -> str:
    """A JSON record in quarantine/ of a refusal whose bytes are not kept; its path."""
    now = datetime.now(UTC)
    rel = f"quarantine/{now:%Y%m%dT%H%M%S%fZ}_{secrets.token_hex(4)}.json"
    store.write(rel, json.dumps({**record, "received_at": now.isoformat()}, indent=2).encode())
    return rel


def _command_uids(assoc: Association) -> tuple[str, str]:
    """Affected SOP Class/Instance UIDs of the message being received, if its command is in."""
    message = assoc.dimse.message
    command = getattr(message, "command_set", None)
    if not isinstance(command, Dataset):
        return "", ""
    return (
        str(command.get("AffectedSOPClassUID", "") or ""),
        str(command.get("AffectedSOPInstanceUID", "") or ""),
    )


class SharedSyntaxContext(PresentationContext):
    """A supported presentation context whose copies share its immutable UIDs.

    pynetdicom deep-copies every supported context for each new association. With
    every storage SOP class times every transfer syntax (171 x 45 UIDs) that cost
    ~40 ms of CPU per association, on every C-ECHO and every one-image association
    a modality opens. The UIDs are immutable strings; only the list needs its own copy.
    """

    @classmethod
    def of(cls, context: PresentationContext) -> SharedSyntaxContext:
        shared = cls()
        shared.__dict__.update(context.__dict__)
        shared._transfer_syntax = list(context._transfer_syntax)
        return shared

    def __deepcopy__(self, memo: dict[int, object]) -> SharedSyntaxContext:
        return SharedSyntaxContext.of(self)


_Server = TypeVar("_Server", bound=ThreadedAssociationServer)


class DicomServer:
    """Owns the pynetdicom AE and its listeners: plain on ``port``, DICOM TLS on ``tls.port``."""

    def __init__(self, settings: DicomSettings, scp: StoreSCP) -> None:
        configure_pynetdicom()
        self.settings = settings
        self.scp = scp
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_pdu_size = settings.max_pdu_size
        ae.maximum_associations = settings.maximum_associations
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.network_timeout = settings.network_timeout
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self._contexts: list[PresentationContext] = [
            SharedSyntaxContext.of(cx) for cx in ae.supported_contexts
        ]
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: TlsAssociationServer | None = None
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        """The plain listener's port (the configured one when ``dicom.plain`` is false)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        """Every started listener still serves (readiness and liveness of the node)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS listener's port, or None when TLS is off."""
        if not self.settings.tls.enabled:
            return None
        if self._tls_server is None:
            return self.settings.tls.port
        return int(self._tls_server.server_address[1])

    def start(self) -> None:
        """Start the listeners; a TLS certificate problem raises :class:`TlsError` first."""
        tls_settings = self.settings.tls
        context = tls.dicom_server_context(tls_settings) if tls_settings.enabled else None
        if self.settings.plain:
            self._server = self._listen(self.settings.port, NoDelayAssociationServer)
        if context is not None:
            server = self._listen(tls_settings.port, TlsAssociationServer)
            server.tls_context = context
            server.handshake_timeout = self.settings.acse_timeout
            self._tls_server = server
        for name, listener in (("dicom-scp", self._server), ("dicom-scp-tls", self._tls_server)):
            if listener is not None:
                thread = threading.Thread(target=listener.serve_forever, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        log.info(
            "DICOM SCP listening ae_title=%s host=%s port=%s tls_port=%s mutual_tls=%s",
            self.settings.ae_title,
            self.settings.host,
            self.port if self._server is not None else "off",
            self.tls_port if self._tls_server is not None else "off",
            tls_settings.enabled and tls_settings.require_client_certificate,
        )

    def _listen(self, port: int, server_class: type[_Server]) -> _Server:
        server = cast(
            _Server,
            self.ae.make_server(
                (self.settings.host, port),
                evt_handlers=self.scp.handlers(),
                contexts=self._contexts,
                server_class=server_class,
                request_handler=EventDrivenRequestHandler,
            ),
        )
        # Registered like AE.start_server() does, so AE.shutdown() closes it too.
        self.ae._servers.append(server)
        return server

    def stop(self) -> None:
        self.ae.shutdown()  # shuts down and closes our servers, then active associations
        self._server = None
        self._tls_server = None
        self.scp.close()
