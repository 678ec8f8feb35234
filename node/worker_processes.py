"""Worker processes that ``triage-node serve`` runs itself in the all-in-one mode.

Each is ``triage-node worker`` (a Celery worker) in its own process group, so
TensorFlow stays out of the node process. A worker that dies is started again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class WorkerProcesses:
    def __init__(
        self,
        count: int,
        *,
        config_path: Path | None,
        log_dir: Path,
        concurrency: int = 1,
    ) -> None:
        self.count = count
        self.config_path = config_path
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config_path is not None:
            env["TRIAGE_NODE_CONFIG"] = str(self.config_path.resolve())
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"worker-{index}.log").open("ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "node",
                    "worker",
                    "--concurrency",
                    str(self.concurrency),
                    "--name",
                    f"triage-{index}-{os.getpid()}@%h",
                    # Embedded workers are watched by this node (its /healthz reports them);
                    # several of them cannot share worker.http_port.
                    "--http-port",
                    "0",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info("worker %d started pid=%d", index, proc.pid)
        return proc

    def start(self) -> None:
        for i in range(self.count):
            self.processes[i] = self._spawn(i)
        self._thread = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            for i, proc in enumerate(self.processes):
                if proc is not None and proc.poll() is not None and not self._stop.is_set():
                    log.warning("worker %d exited with %s; starting it again", i, proc.returncode)
                    self.processes[i] = self._spawn(i)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for proc in self.processes:
            if proc is not None and proc.poll() is None:
                # Only the Celery parent: it stops its pool after the current task (warm
                # shutdown). Signalling the whole group would kill the pool child, and
                # Celery would start a replacement (importing TensorFlow) mid-shutdown.
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            if proc is None:
                continue
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
