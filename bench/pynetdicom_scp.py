"""The floor under the node: a bare pynetdicom C-STORE SCP that only writes the bytes.

Run by ``bench_ingest.py`` as the peer "pynetdicom (floor)": same library, same
event-driven association threads (``node/ingest/reactor.py``), same accepted
contexts, same PDU size and TCP_NODELAY as the node, but no parsing, no
catalogue and no fsync. Whatever the node cannot beat, this shows.

    python bench/pynetdicom_scp.py PORT OUTPUT_DIR [--stock]

``--stock`` uses pynetdicom's own (polling) association threads instead, to show
what the event-driven ones change.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from node.ingest.reactor import EventDrivenRequestHandler

MAX_PDU = 4_194_304  # the node's default dicom.max_pdu_size


class _NoDelayServer(ThreadedAssociationServer):
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    stock = "--stock" in sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        uid = event.request.AffectedSOPInstanceUID
        (out / f"{uid}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        return 0x0000

    ae = AE(ae_title="FLOOR")
    ae.maximum_pdu_size = MAX_PDU
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)  # bench_associations.py
    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        server_class=_NoDelayServer,
        request_handler=RequestHandler if stock else EventDrivenRequestHandler,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.server_close()


if __name__ == "__main__":
    main()
