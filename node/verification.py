"""Verification SOP class SCU (C-ECHO, PS3.4 Annex A): is that AE there and does it talk to us?

Used by ``serve`` to show the listener works, by ``triage-node echo`` and by the
admin page's test button for destinations (:func:`echo_destination`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import dicom_socket, tls

if TYPE_CHECKING:
    from node.config import Destination, Settings


@dataclass(frozen=True, slots=True)
class EchoResult:
    ok: bool
    detail: str


def c_echo(
    host: str,
    port: int,
    *,
    called_ae_title: str,
    calling_ae_title: str,
    timeout: float = 10.0,
    tls_context: ssl.SSLContext | None = None,
) -> EchoResult:
    """C-ECHO ``host:port``; ``tls_context`` for a DICOM TLS peer (a destination's ``tls``).

    Without it a TLS-only PACS cannot answer, though exports to it work.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout  # pynetdicom's default waits for the OS (~2 min)
    ae.add_requested_context(Verification)
    tls_args = None if tls_context is None else (tls_context, host)
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae_title,
        tls_args=tls_args,
        evt_handlers=dicom_socket.HANDLERS,
    )
    try:
        if assoc.is_rejected:
            return EchoResult(False, "association rejected")
        if not assoc.is_established:
            # A failed handshake (untrusted certificate, ours refused) says why, as exports do.
            failure = tls_context.failure if isinstance(tls_context, tls.ClientContext) else None
            return EchoResult(False, failure or "no association (connection refused or timed out)")
        rsp = assoc.send_c_echo()
        code = int(getattr(rsp, "Status", -1)) if rsp else -1
        if code == 0:
            return EchoResult(True, "C-ECHO success")
        return EchoResult(False, "no response" if code < 0 else f"C-ECHO status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def echo_destination(
    settings: Settings, destination: Destination, *, timeout: float = 10.0
) -> EchoResult:
    """C-ECHO a configured destination as an export reaches it: its calling AE title
    (or ``dicom.ae_title``), its called AE title and its TLS settings."""
    try:
        context = (
            None
            if destination.tls is None
            else tls.client_context(destination.tls, what=f"destination {destination.name} tls")
        )
    except tls.TlsError as exc:  # unreadable certificate files: say so, as the export would
        return EchoResult(False, str(exc))
    return c_echo(
        destination.host,
        destination.port,
        called_ae_title=destination.ae_title,
        calling_ae_title=destination.calling_ae_title or settings.dicom.ae_title,
        timeout=timeout,
        tls_context=context,
    )
