"""Association benchmark: C-ECHO round trip and the CPU an idle association costs.

Run from the repository root::

    .venv/bin/python bench/bench_associations.py [--idle-associations 8] [--repeat 3]

Peers (the same launchers as ``bench_ingest.py``): this node, the bare pynetdicom
receiver on the node's event-driven association threads (``node/ingest/reactor.py``),
the same receiver on pynetdicom's own polling threads, and Orthanc.

* **C-ECHO**: DCMTK ``echoscu --repeat 300`` (one association, 300 echoes, ``TCP_NODELAY=1``);
  wall time over 300, best of ``--repeat``. It is the request/response latency every
  C-STORE from a modality that sends one image at a time also pays.
* **Idle CPU**: the peer process's CPU time (user + system, ``psutil``) over 5 s with
  no association, then with ``--idle-associations`` associations open and silent
  (held by a pynetdicom requestor in another process). Hospitals keep associations
  open between studies; a listener that polls pays for each of them all day.

No target is attached; the numbers are for the README and for regressions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from bench_ingest import PeerKind, node_peer, orthanc_peer, pynetdicom_floor_peer
from harness import (
    LOOPBACK,
    NODELAY_ENV,
    SENDER_AE,
    BenchError,
    console,
    interrupt_as_exception,
)
from rich.table import Table

ECHOES = 300
IDLE_SECONDS = 5.0

PEERS = {
    "node": lambda: node_peer(fsync=True),
    "pynetdicom": pynetdicom_floor_peer,
    "pynetdicom-stock": lambda: pynetdicom_floor_peer(stock=True),
    "orthanc": lambda: orthanc_peer(sync_storage=True),
}

#: Holds N silent associations open until stdin closes (a separate process, so its
#: own polling is not counted against the peer).
_HOLDER = """
import sys, time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
ae = AE(ae_title=sys.argv[1])
ae.network_timeout = ae.acse_timeout = 120
ae.add_requested_context(Verification)
port, called, count = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
held = [ae.associate("127.0.0.1", port, ae_title=called) for _ in range(count)]
assert all(a.is_established for a in held), "an association was refused"
print("held", flush=True)
sys.stdin.read()
for a in held:
    a.release()
"""


def listener_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        pid = conn.pid
        if pid is not None and conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            return pid
    raise BenchError(f"no process listens on port {port}")


def cpu_percent(process: psutil.Process, seconds: float) -> float:
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 100.0 * used / seconds


def echo_ms(ae_title: str, port: int) -> float:
    argv = ["echoscu", "-aet", SENDER_AE, "-aec", ae_title, "--repeat", str(ECHOES)]
    argv += [LOOPBACK, str(port)]
    start = time.perf_counter()
    env = {**os.environ, **NODELAY_ENV}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"echoscu failed: {done.stderr.strip()}")
    return 1000.0 * elapsed / ECHOES


@contextlib.contextmanager
def held_associations(ae_title: str, port: int, count: int) -> Iterator[None]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, SENDER_AE, str(port), ae_title, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        if holder.stdout.readline().strip() != "held":
            raise BenchError("could not open the idle associations")
        yield
    finally:
        holder.stdin.close()
        holder.wait(30)


def measure(kind: PeerKind, work: Path, *, idle: int, repeat: int) -> tuple[float, float, float]:
    work.mkdir(parents=True)
    with kind.launch(work) as peer:
        process = psutil.Process(listener_pid(peer.port))
        echo = min(echo_ms(peer.ae_title, peer.port) for _ in range(repeat))
        time.sleep(1.0)  # let start-up work settle before the idle baseline
        baseline = cpu_percent(process, IDLE_SECONDS)
        with held_associations(peer.ae_title, peer.port, idle):
            time.sleep(1.0)
            loaded = cpu_percent(process, IDLE_SECONDS)
    return echo, baseline, loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-associations", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="echoscu runs per peer (best wins)")
    parser.add_argument("--peers", default=",".join(PEERS), help=", ".join(PEERS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)}")
    table = Table(title="Associations: C-ECHO round trip and idle CPU", title_justify="left")
    for column in ("peer", "settings"):
        table.add_column(column)
    table.add_column(f"ms per C-ECHO ({ECHOES} on one association)", justify="right")
    table.add_column("CPU %, no association", justify="right")
    table.add_column(f"CPU %, {args.idle_associations} idle associations", justify="right")
    table.add_column("CPU % per idle association", justify="right")
    root = Path(tempfile.mkdtemp(prefix="bench-assoc-"))
    try:
        with interrupt_as_exception():
            for name in names:
                kind = PEERS[name]()
                with console.status(f"{kind.name}..."):
                    echo, baseline, loaded = measure(
                        kind, root / name, idle=args.idle_associations, repeat=args.repeat
                    )
                per = (loaded - baseline) / args.idle_associations
                table.add_row(
                    kind.name,
                    kind.settings,
                    f"{echo:.2f}",
                    f"{baseline:.1f}",
                    f"{loaded:.1f}",
                    f"{per:.2f}",
                )
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 2
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
