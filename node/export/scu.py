"""C-STORE SCU towards one destination, and what each answer means for a retry.

PS3.4 B.2.3: Success and the Warning statuses (0xB000, 0xB006, 0xB007) mean
the object is stored. "Refused: Out of Resources" (0xA7xx), a refused or
broken association and a timeout are temporary: try again later. So is
"Processing failure" (0x0110), but only a bounded number of times in a row
(:func:`node.export.deliveries.record`, ``export.max_processing_failures``). Any other
failure (0xA9xx data set does not match SOP class, 0xCxxx cannot understand,
0x0122 SOP class not supported, ...) is permanent: sending the same bytes
again cannot succeed, so we do not retry in a loop. With ``destination.tls`` the
association runs over DICOM TLS (PS3.15 B.2); a failed handshake is temporary
and its delivery detail says why (e.g. "TLS certificate verify failed: ...").

Presentation contexts (PS3.8 9.3.2.2, 9.3.3.2): each object's own transfer syntax in a
context of its own, then Explicit and Implicit VR Little Endian, at most 128 contexts
per association; what the destination accepted decides whether an object goes as
stored or decompressed.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node import dicom_socket, tls
from node.config import Destination

log = logging.getLogger(__name__)

_WARNINGS = {0xB000, 0xB006, 0xB007}


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    #: Not attempted: the association ended at an earlier object (a DIMSE timeout
    #: aborts it) or the exporter is stopping. No attempt is counted; it goes next.
    UNSENT = "unsent"


@dataclass(frozen=True, slots=True)
class Delivery:
    outcome: Outcome
    status: int | None
    #: What happened, for the delivery's record and the log.
    detail: str
    #: The destination's Error Comment (0000,0902), for the record only: a PACS may
    #: name the patient in it ("PatientID ... conflicts"), so it is never logged.
    comment: str | None = None

    @property
    def as_recorded(self) -> str:
        """``detail`` with the destination's comment, as the delivery keeps it."""
        return self.detail if not self.comment else f'{self.detail}; Error Comment "{self.comment}"'


#: PS3.7 C.4.2 "Resource limitation": like 0xA7xx, worth trying again later.
_RESOURCE_LIMITATION = 0x0213
#: PS3.7 C.4.2 "Processing failure". For C-STORE a PACS answers it for trouble of its
#: own (database busy, archive offline, a full spool) as often as for a bad object, and
#: the same bytes are then accepted minutes later: temporary, but the delivery queue
#: gives up after export.max_processing_failures of them in a row.
PROCESSING_FAILURE = 0x0110


def classify(status: int) -> Outcome:
    if status == 0x0000 or status in _WARNINGS:
        return Outcome.DELIVERED
    if 0xA700 <= status <= 0xA7FF or status in (_RESOURCE_LIMITATION, PROCESSING_FAILURE):
        return Outcome.TEMPORARY
    return Outcome.PERMANENT


def status_detail(status: int) -> str:
    """How an attempt's C-STORE status reads in the delivery's last_error.

    With its meaning from PS3.4 Annex B as pynetdicom names it, where it has one.
    (0x0110's text is what the count of answers in a row is read back from.)
    """
    if status == PROCESSING_FAILURE:
        return f"C-STORE status 0x{status:04X} (processing failure)"
    _, meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))
    return f"C-STORE status 0x{status:04X}" + (f" ({meaning})" if meaning else "")


def unreadable(exc: Exception, what: str) -> Delivery:
    """An object that could not be read or written here: temporary unless it is gone.

    A missing file will not come back; a full disk, an I/O error or too many open
    files may clear, so those are retried within the destination's retry window.
    """
    detail = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return Delivery(Outcome.TEMPORARY, None, detail)
    return Delivery(Outcome.PERMANENT, None, detail)


@dataclass(frozen=True, slots=True)
class Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str


#: PS3.8 9.3.2.2: an A-ASSOCIATE-RQ carries at most 128 presentation contexts.
MAX_CONTEXTS = 128
#: What every destination must take (PS3.5 10.1); pynetdicom converts between the two.
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

Context = tuple[str, tuple[str, ...]]


def send(
    destination: Destination,
    items: Sequence[Item],
    *,
    calling_ae_title: str,
    timeout: float,
    stop: threading.Event | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> list[Delivery]:
    """Send ``items``; one :class:`Delivery` per item, in order.

    One association, or several when the items need more than :data:`MAX_CONTEXTS`
    presentation contexts (many SOP classes times transfer syntaxes). Once ``stop``
    is set, the association is aborted (A-ABORT, PS3.8 7.3) before the next object
    and the rest are :attr:`Outcome.UNSENT`. ``heartbeat`` is called before each
    association and each object (the exporter keeps its claim on them alive).
    """
    results: list[Delivery] = []
    for batch in _batches(items):
        if stop is not None and stop.is_set():
            results.extend([_STOPPING] * len(batch))
            continue
        if heartbeat is not None:
            heartbeat()
        results.extend(
            _send_batch(
                destination,
                batch,
                calling_ae_title=calling_ae_title,
                timeout=timeout,
                stop=stop,
                heartbeat=heartbeat,
            )
        )
    return results


_STOPPING = Delivery(Outcome.UNSENT, None, "not sent: the exporter is stopping")
_ASSOCIATION_LOST = Delivery(
    Outcome.UNSENT, None, "not sent: the association ended at an earlier object"
)


def _batches(items: Sequence[Item]) -> list[list[tuple[Item, list[Context]]]]:
    """``items`` with the contexts each needs, in order, cut where 128 would be exceeded."""
    batches: list[list[tuple[Item, list[Context]]]] = []
    proposed: set[Context] = set()
    for item in items:
        needed = _contexts(item)
        if not batches or len(proposed | set(needed)) > MAX_CONTEXTS:
            batches.append([])
            proposed = set()
        batches[-1].append((item, needed))
        proposed.update(needed)
    return batches


def _contexts(item: Item) -> list[Context]:
    """The object's own transfer syntax alone, then the uncompressed ones together.

    A context offering several syntaxes gets only one of them accepted, chosen by
    the destination (PS3.8 9.3.3.2): offered together, a JPEG object's own syntax
    could lose to Implicit VR and be decompressed for nothing, and objects of one
    SOP class in two compressed syntaxes could not both go as they are.
    """
    own = _transfer_syntax(item.path)
    contexts: list[Context] = []
    if own and own not in _UNCOMPRESSED:
        contexts.append((item.sop_class_uid, (own,)))
    contexts.append((item.sop_class_uid, _UNCOMPRESSED))
    return contexts


def _send_batch(
    destination: Destination,
    batch: Sequence[tuple[Item, list[Context]]],
    *,
    calling_ae_title: str,
    timeout: float,
    stop: threading.Event | None,
    heartbeat: Callable[[], None] | None,
) -> list[Delivery]:
    """Send ``batch`` over one association."""
    items = [item for item, _ in batch]
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    # connection_timeout too: pynetdicom leaves the TCP connect unbounded, and a PACS
    # behind a firewall that drops packets then held the exporter ~2 minutes per send.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in dict.fromkeys(cx for _, needed in batch for cx in needed):
        ae.add_requested_context(sop_class, list(syntaxes))
    context: tls.ClientContext | None = None
    try:
        if destination.tls is not None:
            context = tls.client_context(
                destination.tls, what=f"destination {destination.name} tls"
            )
    except tls.TlsError as exc:
        # The admin may fix the files while the delivery waits: retry, do not give up.
        ae.shutdown()
        return [Delivery(Outcome.TEMPORARY, None, str(exc))] * len(items)
    tls_args = None if context is None else (context, destination.host)
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=dicom_socket.HANDLERS,
        )
    except Exception as exc:  # DNS errors and the like
        ae.shutdown()
        return [Delivery(Outcome.TEMPORARY, None, f"cannot connect: {exc}")] * len(items)
    try:
        if assoc.is_rejected:
            return [Delivery(Outcome.TEMPORARY, None, "association rejected")] * len(items)
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The destination answered the negotiation and took none of the SOP classes
            # (in any transfer syntax we offered): the same answer as for one class of
            # several, so the same outcome; only its configuration can change it.
            return [_not_accepted(item) for item in items]
        if not assoc.is_established:
            # A TLS failure (untrusted certificate, our client certificate refused)
            # is temporary too: certificates get fixed; the reason tells the admin what.
            detail = (context.failure if context is not None else None) or (
                "no association (refused, aborted or timed out)"
            )
            return [Delivery(Outcome.TEMPORARY, None, detail)] * len(items)
        return _store_all(assoc, items, stop, heartbeat)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _store_all(
    assoc: Any,
    items: Sequence[Item],
    stop: threading.Event | None,
    heartbeat: Callable[[], None] | None,
) -> list[Delivery]:
    """C-STORE ``items`` in order over ``assoc``, aborting it once ``stop`` is set."""
    results: list[Delivery] = []
    for item in items:
        if heartbeat is not None:
            heartbeat()
        if stop is not None and stop.is_set():
            if assoc.is_established:
                assoc.abort()
            results.append(_STOPPING)
        elif results and not assoc.is_established:
            # A DIMSE timeout aborted it (or the peer did): the objects behind the
            # one that hung must not wait out its backoff, nor count an attempt.
            # (The first object always counts one, so a peer that aborts every
            # association still meets the backoff and the retry window.)
            results.append(_ASSOCIATION_LOST)
        else:
            results.append(_store(assoc, item))
    return results


#: How a delivery's last_error starts when the destination took none of its SOP class.
NOT_ACCEPTED = "destination does not accept SOP class"


def _not_accepted(item: Item, in_syntax: str = "") -> Delivery:
    what = f"{NOT_ACCEPTED} {item.sop_class_uid} ({UID(item.sop_class_uid).name}){in_syntax}"
    return Delivery(Outcome.PERMANENT, None, what)


def _store(assoc: Any, item: Item) -> Delivery:
    accepted = {
        UID(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class_uid
    }
    if not accepted:
        return _not_accepted(item)
    try:
        ds = dcmread(item.path)
        tsuid = ds.file_meta.TransferSyntaxUID
    except Exception as exc:
        return unreadable(exc, "cannot prepare object")
    if tsuid not in accepted:
        if not accepted.intersection(_UNCOMPRESSED):
            return _not_accepted(item, f" in {tsuid.name} or uncompressed")
        if not tsuid.is_little_endian:
            # pydicom leaves the byte order of OB/OW/OF/OD/OL/OV/UN values to its
            # caller (dcmwrite), and pynetdicom would encode them unchanged: wrong
            # pixels at the PACS. Sending the same file again cannot help.
            return _not_accepted(
                item, f" in {tsuid.name} (retired; its byte order is not converted here)"
            )
        if tsuid.is_compressed:
            # The destination took only uncompressed syntaxes for this SOP class. A
            # lossless change of encoding keeps the instance's identity; for a lossy
            # source the pixels are already what they are, and decoding changes nothing
            # (Lossy Image Compression stays "01"). Deflate is undone by pynetdicom.
            try:
                ds.decompress(generate_instance_uid=False)
                _mark_lossy(ds, tsuid)
            except Exception as exc:
                # No decoder here for this syntax, or pixel data it cannot decode: the
                # next attempt would fail the same way.
                return Delivery(
                    Outcome.PERMANENT,
                    None,
                    f"cannot decompress {tsuid.name} for a destination that takes only "
                    f"uncompressed {UID(item.sop_class_uid).name}: {type(exc).__name__}: {exc}",
                )
    try:
        rsp = assoc.send_c_store(ds)
    except Exception as exc:
        return Delivery(Outcome.TEMPORARY, None, f"send failed: {type(exc).__name__}: {exc}")
    if rsp is None or "Status" not in rsp:
        return Delivery(Outcome.TEMPORARY, None, "no response (timeout or abort)")
    code = int(rsp.Status)
    comment = rsp.get("ErrorComment")
    return Delivery(classify(code), code, status_detail(code), str(comment) if comment else None)


#: Syntaxes that are lossy whatever their parameters (PS3.5 A.4), with the Lossy Image
#: Compression Method each implies (PS3.3 C.7.6.1.1.5.1). JPEG 2000 and HTJ2K may be
#: either; for those only the object's own Lossy Image Compression can say.
_LOSSY_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
}


def _mark_lossy(ds: Dataset, source_syntax: UID) -> None:
    """Keep the decoded pixels marked as lossy once their transfer syntax no longer says so.

    PS3.3 C.7.6.1.1.5: Lossy Image Compression is "01" once an image has been lossy
    compressed, and is never reset. pydicom's decompress keeps the element but does not
    add it, so a JPEG baseline original without it would reach the PACS looking lossless.
    """
    method = _LOSSY_METHODS.get(source_syntax)
    if method is None:
        return
    ds.LossyImageCompression = "01"
    if "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = method


def _transfer_syntax(path: Path) -> str | None:
    try:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        return str(meta.TransferSyntaxUID)
    except Exception:
        return None
