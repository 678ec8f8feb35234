"""The worker's HTTP endpoint: /healthz, /readyz and /metrics from the Celery main process.

A small thread in the main (consumer) process, started before the prefork pool:
orchestrators probe it, Prometheus scrapes it. /metrics sums every pool child
through prometheus_client's multiprocess files (:func:`prepare_multiprocess_dir`
must run before ``prometheus_client`` is first imported, so before the tasks
module). Nothing here carries patient data: states, reasons, counts, PIDs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import Engine

from node.config import Settings, weights_problems
from node.db.engine import make_engine
from node.observability import health
from node.observability.health import pid_alive

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: A pool process that could not load a model leaves ``model-failed-<pid>-<model>``
#: (the reason) in the metrics directory, which it shares with the main process.
MODEL_FAILED = "model-failed-"


def record_model_load(model: str, error: BaseException | None) -> None:
    """Tell the main process's /readyz whether this (pool) process could load ``model``.

    Models load in the pool processes, the probes answer in the main process: without
    this a worker whose every study fails for want of its models still says ready.
    """
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    path = Path(folder) / f"{MODEL_FAILED}{os.getpid()}-{model}"
    try:
        if error is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"{type(error).__name__}: {error}"[:500], encoding="utf-8")
    except OSError as exc:
        log.warning("cannot record the model state in %s: %s", folder, exc.strerror)


def model_load_failures(folder: Path) -> list[str]:
    """Models that live pool processes could not load (files of dead ones are removed)."""
    reasons = []
    for path in sorted(folder.glob(f"{MODEL_FAILED}*")):
        pid, _, model = path.name[len(MODEL_FAILED) :].partition("-")
        if not pid.isdigit() or not pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            continue
        try:
            reason = path.read_text(encoding="utf-8")
        except OSError:
            continue  # cleared meanwhile
        reasons.append(f"process {pid} could not load model {model}: {reason}")
    return reasons


def prepare_multiprocess_dir(data_dir: Path) -> Path:
    """A fresh metrics directory for this worker, under ``<data_dir>/worker-metrics``.

    One per host and main PID, so workers sharing a data_dir (several on one host,
    or hosts mounting one volume) never mix their files. Directories this host's
    earlier, dead workers left behind are removed; others' are left alone.
    """
    root = data_dir / "worker-metrics"
    host = socket.gethostname()
    for old in root.glob(f"{host}-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / f"{host}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


class WorkerHealth:
    """Probes of one Celery worker, fed by Celery's worker signals."""

    def __init__(self, celery: Any, settings: Settings, host: str, port: int) -> None:
        self.celery = celery
        self.settings = settings
        self.host = host
        self.port = port
        #: Set when the consumer is connected and consuming (``worker_ready``).
        self.ready = threading.Event()
        self.shutting_down = threading.Event()
        self._controller: Any = None
        self._engine: Engine = make_engine(settings.database_url)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.multiprocess_dir: Path | None = None
        self._storage_problems: list[str] | None = None
        self._checks = health.BoundedChecks()

    # -- Celery signals ---------------------------------------------------------------
    def connect_signals(self) -> None:
        signals.worker_init.connect(self._on_init, weak=False)
        signals.worker_ready.connect(self._on_ready, weak=False)
        signals.worker_shutdown.connect(self._on_shutdown, weak=False)
        signals.worker_process_init.connect(self._in_child, weak=False)

    def _on_init(self, sender: Any = None, **_: Any) -> None:
        self._controller = sender

    def _on_ready(self, **_: Any) -> None:
        self.ready.set()
        log.info("worker ready; health endpoint on %s:%d", self.host, self.bound_port)

    def _on_shutdown(self, **_: Any) -> None:
        self.shutting_down.set()
        self.ready.clear()

    def _in_child(self, **_: Any) -> None:
        """A pool child got copies of the listening socket and the database pool: drop them."""
        if self._server is not None:
            self._server.socket.close()
        self._engine.dispose(close=False)

    # -- what the endpoints say -------------------------------------------------------
    def liveness(self) -> tuple[int, dict[str, Any]]:
        info: dict[str, Any] = {
            "status": "stopping" if self.shutting_down.is_set() else "ok",
            "role": "worker",
            "pid": os.getpid(),
            "consuming": self.ready.is_set(),
            "processes": self._pool_processes(),
        }
        return (503 if self.shutting_down.is_set() else 200), info

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """Each check by name; broker and database side by side, each within its limit."""
        consuming: tuple[str, ...] = ()
        if self.shutting_down.is_set():
            consuming = ("worker is shutting down",)
        elif not self.ready.is_set():
            consuming = ("not consuming yet",)
        checks = [health.Check("consuming", consuming)]
        checks += self._checks.run(
            [
                (
                    "broker",
                    health.BROKER_CHECK_SECONDS,
                    lambda: health.broker_problems(self.celery),
                ),
                (
                    "database",
                    health.DATABASE_CHECK_SECONDS,
                    lambda: health.database_problems(self._engine),
                ),
            ]
        )
        checks.append(health.Check("models", tuple(self._model_problems())))
        checks.append(health.Check("storage", tuple(self.storage_problems())))
        reasons = [problem for check in checks for problem in check.problems]
        body = {
            "status": "not ready" if reasons else "ready",
            "role": "worker",
            "checks": {check.name: check.as_json() for check in checks},
            "reasons": reasons,
        }
        return (503 if reasons else 200), body

    def _model_problems(self) -> list[str]:
        """Weights gone since start (an unmounted volume), or models a process failed to load."""
        from models.registry import SHIPPED_DIR

        folder = self.settings.models.weights_dir
        reasons = [f"models.weights_dir: {p}" for p in weights_problems(folder or SHIPPED_DIR)]
        shared = self.multiprocess_dir or os.environ.get(MULTIPROC_ENV)
        if shared:
            reasons += model_load_failures(Path(shared))
        return reasons

    def storage_problems(self) -> list[str]:
        """worker.storage the settings cannot build: every study would fail with it.

        Checked once (settings do not change while the worker runs); the pool processes
        build the same storage from the same settings and record each study's failure.
        """
        if self._storage_problems is None:
            from workers.storage import storage_from_settings

            try:
                storage_from_settings(self.settings)
                self._storage_problems = []
            except Exception as exc:
                self._storage_problems = [f"worker.storage: {type(exc).__name__}: {exc}"]
        return self._storage_problems

    def metrics(self) -> bytes:
        from node.observability.metrics import exposition, worker_registry

        return exposition(worker_registry())

    def _pool_processes(self) -> list[int]:
        pool = getattr(self._controller, "pool", None)
        try:
            return [int(pid) for pid in pool.info.get("processes", [])] if pool else []
        except Exception:  # the pool is starting or stopping
            return []

    # -- the HTTP thread --------------------------------------------------------------
    @property
    def bound_port(self) -> int:
        if self._server is None:
            return self.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; a port in use is logged and the worker runs without the endpoint."""
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                """Monitors that probe with HEAD get the status line and headers only."""
                self._head_only = True
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics" and probes.settings.web.metrics:
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, probes.metrics(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    code, body = probes.liveness() if path == "/healthz" else probes.readiness()
                    self._send(code, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b'{"detail": "Not Found"}', "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not getattr(self, "_head_only", False):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: probes every few seconds would flood the worker's log."""

        try:
            server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            log.warning(
                "worker health endpoint not started on %s:%d: %s (worker.http_port)",
                self.host,
                self.port,
                exc.strerror,
            )
            return
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="worker-http", daemon=True
        )
        self._thread.start()
        log.info("worker health endpoint listening on %s:%d", self.host, self.bound_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._engine.dispose()
        if self.multiprocess_dir is not None:
            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)
