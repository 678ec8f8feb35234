"""pynetdicom's association socket, asked "is there data?" with ``poll()``, not ``select()``.

pynetdicom 3.0 checks its socket with ``select.select``, which cannot watch a
descriptor numbered 1024 or above: it raises, and pynetdicom reads that as
"connection closed" (Evt17). A node serving many web clients, database
connections and associations at once gets such numbers, and then every new
DICOM connection, in or out, would be dropped on its first read. ``poll()``
has no such limit.

The listener swaps accepted sockets to a subclass of :class:`PollingAssociationSocket`
(``node.ingest.limits``); outgoing associations (exports, C-ECHO checks) bind
:func:`on_connection_open` to ``EVT_CONN_OPEN``, which pynetdicom triggers in
the DUL thread right after connecting, before its first read.
"""

from __future__ import annotations

import select
import ssl
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket


class PollingAssociationSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` works for any descriptor number."""

    @property
    def ready(self) -> bool:
        """Upstream's ``ready`` (pynetdicom 3.0.x) with ``select`` made ``poll``.

        As upstream: data waiting, end of file and errors all count as ready (the
        read that follows finds out which); a socket that cannot be polled is Evt17.
        """
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        # Decrypted bytes an SSLSocket already holds are invisible to poll (#528).
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError):
            # Evt17: Transport connection closed
            self.event_queue.put("Evt17")
            return False
        return bool(events)


def use_poll(sock: AssociationSocket | None) -> None:
    """Make ``sock`` a :class:`PollingAssociationSocket` (only its methods change)."""
    if sock is not None and not isinstance(sock, PollingAssociationSocket):
        sock.__class__ = PollingAssociationSocket


def on_connection_open(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler for outgoing associations."""
    use_poll(event.assoc.dul.socket)


#: Pass as ``evt_handlers`` to ``AE.associate``.
HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, on_connection_open)]
