"""Event-driven association threads for pynetdicom's acceptor (the node's ingest hot path).

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps
1 ms whenever it finds nothing to do, and the association thread sleeps 1 ms
before every look at its message queue (upstream marks the first "TODO: try and
make this event based"). A modality sending one image at a time waits for each
C-STORE response, so every image pays up to ~1 ms twice: once until the
association thread notices the decoded request, once until the DUL thread
notices the response to send. That idle time was a sixth of a bare pynetdicom
receiver's time per CT image (287 -> 345 images/s without it), and each idle
association cost ~4% of a core in polling (0.4% here; bench/bench_associations.py).

Here the same loops block instead of sleeping:

- the DUL thread waits in ``poll`` on its socket and a doorbell, rung whenever
  the association hands it a primitive or asks it to stop;
- the association thread waits on an event, set whenever the DUL hands it a
  DIMSE message or an A-RELEASE/A-ABORT primitive, or when it is killed.

Both waits are capped (:data:`POLL_SECONDS`) so timers (ARTIM, the network idle
timeout) and a DUL that died are still seen promptly, as upstream's loops see
them. Everything else, the PS3.8 state machine, PDU codecs and DIMSE assembly,
is pynetdicom's own. The two loop bodies below are upstream's (pynetdicom 3.0.x)
with only the sleeps replaced; ``tests/unit/test_reactor.py`` fails when the
installed pynetdicom's loops differ from those this module was derived from, so
an upgrade is reviewed here before it ships.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
import weakref
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

if TYPE_CHECKING:
    from pynetdicom.ae import ApplicationEntity

# The loops log as upstream's do, so logging configuration treats them alike.
_dul_log = logging.getLogger("pynetdicom.dul")
_assoc_log = logging.getLogger("pynetdicom.association")

#: Longest a loop blocks without an event: the latency for timer expiry and a
#: dead peer thread to be noticed (upstream polls them every ~1 ms; timers are
#: in seconds, so 50 ms changes nothing a peer can observe).
POLL_SECONDS = 0.05


def _close_pipe(read: int, write: int) -> None:
    os.close(read)
    os.close(write)


class Doorbell:
    """A self-pipe: ``ring()`` from any thread wakes a ``poll``/``select`` on :meth:`fileno`.

    Ringing and closing hold a lock, so a late ring can never write into a
    descriptor number the process has meanwhile reused for something else.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False
        # A bell whose loop never ran still gives its descriptors back.
        self._finalizer = weakref.finalize(self, _close_pipe, self._read, self._write)

    def fileno(self) -> int:
        return self._read

    def ring(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes the reader already
                os.write(self._write, b"\0")

    def drain(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._finalizer()


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after every put, so its consumer need not poll."""

    def __init__(self, notify: Callable[[], object]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider, waiting on its socket and a doorbell instead of sleeping."""

    def __init__(self, assoc: Association, wake_association: Callable[[], object]) -> None:
        # The bell exists before the base class assigns ``_kill_thread``.
        self._bell = Doorbell()
        self._stopping = False
        super().__init__(assoc)
        # Primitives from the association (responses, A-RELEASE-RP, aborts) ring the bell;
        # primitives for the association wake its thread.
        self.to_provider_queue = _NotifyingQueue(self._bell.ring)
        self.to_user_queue = _NotifyingQueue(wake_association)
        self._wake_association = wake_association

    @property
    def _kill_thread(self) -> bool:
        return self._stopping

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        # Set by kill_dul(), stop_dul() and the abort path: wake the loop to see it.
        self._stopping = value
        if value:
            self._bell.ring()

    def _wait(self) -> None:
        """Block until the socket is readable, the bell rings, or POLL_SECONDS pass.

        ``poll`` rather than ``select``: a busy process may hold descriptors above
        select's limit of 1024.
        """
        poller = select.poll()
        poller.register(self._bell.fileno(), select.POLLIN)
        transport = self.socket
        raw = transport.socket if transport is not None else None
        if raw is not None:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: poll cannot see them
            if raw.fileno() >= 0:
                poller.register(raw.fileno(), select.POLLIN)
        # A socket closed under us raises here; the loop's own checks then raise Evt17.
        with contextlib.suppress(OSError, ValueError):
            poller.poll(POLL_SECONDS * 1000)
        self._bell.drain()

    def run_reactor(self) -> None:
        """Upstream's DUL loop (pynetdicom 3.0.x ``run_reactor``) with the sleep made a wait."""
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True

                if sleep:
                    self._wait()

                if self._kill_thread:
                    break

                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")

                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    _dul_log.error("Exception in DUL.run(), aborting association")
                    _dul_log.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return

                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue

                if event == "Evt15" and self.state_machine.current_state in ("Sta1", "Sta2"):
                    # A local abort (node shutdown) racing a connection that never sent
                    # its A-ASSOCIATE-RQ: PS3.8 defines no A-ABORT there, and upstream's
                    # state machine raises. There is no association; drop the transport.
                    if self.state_machine.current_state == "Sta2":
                        self.socket.close()  # Evt17: AA-5, back to Sta1
                    sleep = False
                    continue

                self.state_machine.do_action(event)
                sleep = False
        finally:
            self._finish()

    def _finish(self) -> None:
        """The loop has ended: tell the association thread now, not at its next poll."""
        if not self.assoc.is_established:
            # The connection ended before an association (a port check, a peer that
            # gave up): the acceptor thread waits for an A-ASSOCIATE-RQ that cannot
            # come now. An empty hand ends its wait as its ACSE timeout would, so the
            # association slot is free at once instead of after acse_timeout.
            # (receive_pdu() returns None for "nothing came"; the queue's type omits it.)
            cast("queue.Queue[None]", self.to_user_queue).put(None)
        self._wake_association()
        self._bell.close()


class EventDrivenAssociation(Association):
    """An acceptor :class:`Association` whose threads block on events instead of polling."""

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        self._wakeup = threading.Event()
        self._killed = False
        super().__init__(ae, mode)
        self.dul = EventDrivenDUL(self, self._wakeup.set)
        # The timeouts live on the DUL's timers: give them to this DUL too.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self.dimse.msg_queue = _NotifyingQueue(self._wakeup.set)

    @property
    def _kill(self) -> bool:
        return self._killed

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self._killed = value
        if value:
            self._wakeup.set()

    def _run_reactor(self) -> None:
        """Upstream's acceptor loop (pynetdicom 3.0.x ``_run_reactor``) with the sleep a wait."""
        self._is_paused = False
        while not self._kill:
            self._wakeup.wait(POLL_SECONDS)
            self._wakeup.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                # More may have queued while serving: look again without waiting.
                self._wakeup.set()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _assoc_log.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                _assoc_log.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _assoc_log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating :class:`EventDrivenAssociation` acceptors.

    Passed to the server as ``request_handler`` (an ``AssociationServer`` argument).
    The body is upstream's ``_create_association`` with the class swapped.
    """

    def _create_association(self) -> Association:
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server

        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"

        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # The server's contexts are SharedSyntaxContext: cheap copies (see scp.py).
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)

        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])

        return assoc
