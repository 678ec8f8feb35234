"""The benchmark harness: peers as processes on free ports, timed trials, one table.

Every benchmark in ``bench/`` compares this node with reference implementations
run on the same machine in the same run, because only ratios measured side by
side mean anything on a shared, noisy host. This module holds what they share:

* :func:`free_port` hands out loopback ports no one else in this run got;
* :class:`PeerProcess` starts a server, waits until it answers, and always
  stops it (terminate, then kill), also on Ctrl-C;
* :class:`Trial` and :func:`summarise` turn timed runs into rates;
* :func:`print_table` and :func:`write_json` report them;
* :func:`node_process` and :func:`storescu_argv` are this node and the one
  sender every benchmark uses, with the same settings everywhere.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w
from rich.console import Console
from rich.table import Table

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
TRIAGE_NODE = REPO / ".venv" / "bin" / "triage-node"
#: DCMTK's and Orthanc's upper limit for the maximum PDU length they receive.
DCMTK_MAX_PDU = 131_072
#: The sender's environment: without this Debian's DCMTK leaves Nagle's algorithm on.
NODELAY_ENV = {"TCP_NODELAY": "1"}
SENDER_AE = "STORESCU"  # admitted from 127.0.0.1 by the node's default allowed_callers
#: Wide enough for a settings column on one line when the output is a file or a pipe.
console = Console(width=None if Console().is_terminal else 160)


class BenchError(RuntimeError):
    """A benchmark could not measure what it claims to measure: stop loudly."""


# -- ports ------------------------------------------------------------------------------
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on loopback now and not handed out before in this process.

    The kernel picks it (bind to port 0); remembering what we gave keeps two
    peers of one run from being told the same port before either binds it.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise BenchError("no free loopback port found")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(ready: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what}")


# -- processes --------------------------------------------------------------------------
@dataclass
class PeerProcess:
    """A server process under test, started in its own session and always stopped.

    Its output goes to ``log_path`` (read it when something fails). The own
    session keeps a Ctrl-C in the terminal from reaching the child first: we
    stop it ourselves, in order, in ``__exit__``.
    """

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    ready: Callable[[], bool] | None = None
    start_timeout: float = 60.0
    #: How long a graceful stop may take before SIGKILL.
    stop_timeout: float = 10.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> PeerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(self.stop_timeout)

    def start(self) -> None:
        env = {**os.environ, **(self.env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        try:
            if self.ready is not None:
                wait_until(self._ready_or_dead, timeout=self.start_timeout, what=self.name)
            self.check_alive()
        except BaseException:
            self.stop()
            raise

    def _ready_or_dead(self) -> bool:
        self.check_alive()
        assert self.ready is not None
        return self.ready()

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self._proc.returncode}; "
                f"last output:\n{self.tail()}"
            )

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful), then SIGKILL; only the process we started, by its id."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def run_checked(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion; a non-zero exit is a :class:`BenchError` with its output."""
    result = subprocess.run(
        list(argv),
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(
            f"{argv[0]} exited with status {result.returncode}:\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )
    return result


def node_process(
    work: Path,
    config: Mapping[str, Mapping[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    start_timeout: float = 60.0,
    stop_timeout: float = 10.0,
) -> PeerProcess:
    """``triage-node serve`` on ``config`` (written to ``work/node.toml``).

    Ready when its DICOM port (``config["dicom"]["port"]``) answers; its output
    goes to ``work/node.log``.
    """
    path = work / "node.toml"
    path.write_text(tomli_w.dumps(config))
    port = int(config["dicom"]["port"])
    return PeerProcess(
        name="triage-node",
        argv=[str(TRIAGE_NODE), "serve", "--config", str(path)],
        log_path=work / "node.log",
        env={"COLUMNS": "200", **(env or {})},
        ready=lambda: port_open(port),
        start_timeout=start_timeout,
        stop_timeout=stop_timeout,
    )


def storescu_argv(called_ae: str, port: int, paths: Sequence[Path]) -> list[str]:
    """The one sender: the files (or folders' files) over one association.

    ``-R`` proposes only the SOP classes the files have (not DCMTK's ~120
    presentation contexts); the files' transfer syntax is proposed first, so
    nothing is converted on the way. Run it with :data:`NODELAY_ENV`.
    """
    return [
        "storescu",
        "-aet", SENDER_AE,
        "-aec", called_ae,
        "-R",
        "--max-pdu", str(DCMTK_MAX_PDU),
        "+sd",
        LOOPBACK, str(port), *map(str, paths),
    ]  # fmt: skip


SENDER_SETTINGS = f"storescu -R --max-pdu {DCMTK_MAX_PDU} +sd, TCP_NODELAY=1, one association"


@contextlib.contextmanager
def interrupt_as_exception() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so ``finally`` blocks stop every peer either way."""

    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One timed run: how many items of how many bytes took how long."""

    seconds: float
    items: int
    bytes: int

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


@dataclass
class PeerResult:
    """All trials of one peer configuration, and the trial the table reports."""

    peer: str
    settings: str
    trials: list[Trial] = field(default_factory=list)

    def best(self) -> Trial:
        """The fastest trial: on a shared host, noise only ever slows a run down."""
        if not self.trials:
            raise BenchError(f"{self.peer}: no trial completed")
        return min(self.trials, key=lambda t: t.seconds)

    def median_seconds(self) -> float:
        return statistics.median(t.seconds for t in self.trials)

    def as_dict(self) -> dict[str, Any]:
        best = self.best()
        return {
            "peer": self.peer,
            "settings": self.settings,
            "best": {**asdict(best), "items_per_s": best.items_per_s, "mb_per_s": best.mb_per_s},
            "median_seconds": self.median_seconds(),
            "trials": [asdict(t) for t in self.trials],
        }


def print_table(
    title: str,
    results: Sequence[PeerResult],
    *,
    reference: PeerResult,
    item_label: str = "images/s",
) -> None:
    """One row per peer configuration; the ratio column is each row's rate over the reference's.

    The ratio is written peer/reference, so the reference row reads 1.00x.
    """
    table = Table(title=title, title_justify="left")
    table.add_column("peer", style="bold")
    table.add_column("settings")
    table.add_column("seconds", justify="right")
    table.add_column(item_label, justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column(f"vs {reference.peer}", justify="right")
    ref_rate = reference.best().items_per_s
    for result in results:
        best = result.best()
        table.add_row(
            result.peer,
            result.settings,
            f"{best.seconds:.2f}",
            f"{best.items_per_s:.1f}",
            f"{best.mb_per_s:.1f}",
            f"{best.items_per_s / ref_rate:.2f}x",
        )
    console.print(table)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        raise BenchError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def machine_description() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": list(load),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
