"""The running node: wires settings, database, store, DICOM listener, completion and web.

``triage-node serve`` builds one :class:`Node`; tests build them too, on free
ports and temporary data directories. A node runs in one of three roles
(:data:`ROLES`): ``all`` (everything in one process, the default), ``dicom``
(listener, completion, pipeline supervisor, exporter, retention, embedded workers
and a service HTTP app with health and metrics) or ``web`` (the worklist/REST
application only). The internal API for workers and the web role (WADO-RS, result
upload) has a listener of its own with ``cluster.internal_port``; the web role never
serves it. Roles share one database and one broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.completion import CompletionHook, CompletionMonitor
from node.config import Settings
from node.db import migrate
from node.db.engine import READ_ONLY, make_engine, make_sessionmaker
from node.errors import NodeError
from node.export.exporter import Exporter
from node.ingest.callers import CallerPolicy
from node.ingest.limits import BacklogGauge, IngestLimits, count_backlog
from node.ingest.scp import DicomServer, StoreSCP
from node.observability import health
from node.pipeline import Pipeline, PipelineSupervisor
from node.retention import Retention, RetentionMonitor
from node.routing.store import RuleStore
from node.storage import InstanceStore
from node.worker_processes import WorkerProcesses

log = logging.getLogger(__name__)


class SchemaOutOfDate(NodeError):
    """The database schema is behind the code and auto-upgrade is off."""


Role = Literal["all", "dicom", "web"]
ROLES: tuple[Role, ...] = ("all", "dicom", "web")


class Node:
    """One node process in one role (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        role: Role = "all",
        config_path: Path | None = None,
        completion_hooks: Sequence[CompletionHook] = (),
        pipeline: bool = True,
    ) -> None:
        if role not in ROLES:
            raise NodeError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        if role == "web" and not settings.web.enabled:
            raise NodeError("the web role needs web.enabled = true")
        self.settings = settings
        self.role: Role = role
        self.config_path = config_path
        self.engine: Engine = make_engine(
            settings.database_url, durable=settings.storage.fsync, echo=settings.database.echo
        )
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        #: For handlers that only read (worklist, study pages, WADO-RS): on SQLite they
        #: read a snapshot and never queue behind the ingest writers for the lock.
        self.reads: sessionmaker[Session] = make_sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True})
        )
        self.store = InstanceStore(
            settings.storage.data_dir,
            min_free_bytes=settings.storage.min_free_bytes,
            fsync=settings.storage.fsync,
            direct_io=settings.storage.direct_io,
        )
        self.catalog = Catalog(self.sessions)
        self.rules = RuleStore(
            self.sessions, known_destinations=[d.name for d in settings.destinations]
        )
        self.scp: StoreSCP | None = None
        self.dicom: DicomServer | None = None
        self.exporter: Exporter | None = None
        self.retention: RetentionMonitor | None = None
        self.completion: CompletionMonitor | None = None
        self.celery: Any | None = None
        self.pipeline: Pipeline | None = None
        self.supervisor: PipelineSupervisor | None = None
        self.workers: WorkerProcesses | None = None
        self._checks = health.BoundedChecks()
        if role != "web":
            self._build_dicom_role(config_path, completion_hooks, pipeline=pipeline)
        self._web: WebServer | None = None
        self._internal: WebServer | None = None

    def _build_dicom_role(
        self,
        config_path: Path | None,
        completion_hooks: Sequence[CompletionHook],
        *,
        pipeline: bool,
    ) -> None:
        """Listener, completion, pipeline supervisor, exporter, retention, embedded workers."""
        settings = self.settings
        self.scp = StoreSCP(
            store=self.store,
            catalog=self.catalog,
            callers=CallerPolicy(settings.dicom.allowed_callers, settings.dicom.ae_title),
            limits=IngestLimits.from_settings(settings.dicom),
            backlog=BacklogGauge(
                settings.pipeline.max_backlog_studies, count_backlog(self.sessions)
            ),
        )
        self.dicom = DicomServer(settings.dicom, self.scp)
        self.exporter = Exporter(settings, self.sessions, self.store)
        retention = Retention(settings.retention, self.sessions, self.store)
        self.retention = RetentionMonitor(retention) if retention.enabled else None
        hooks = list(completion_hooks)
        if pipeline:
            from workers.celery_app import make_celery

            self.celery = make_celery(settings)
            self.pipeline = Pipeline(settings, self.sessions, self.store, self.rules, self.celery)
            self.supervisor = PipelineSupervisor(self.pipeline)
            hooks.append(self.pipeline.on_complete)
            if settings.pipeline.workers > 0:
                self.workers = WorkerProcesses(
                    settings.pipeline.workers,
                    config_path=config_path,
                    log_dir=self.store.data_dir / "logs",
                )
        self.completion = CompletionMonitor(
            self.catalog,
            settings.study.quiet_seconds,
            settings.study.check_interval_seconds,
            hooks=hooks,
        )

    def prepare_database(self) -> None:
        if self.settings.database.auto_upgrade:
            migrate.upgrade(self.engine)
        elif not migrate.is_up_to_date(self.engine):
            raise SchemaOutOfDate(
                "database schema is not at the current revision; run 'triage-node db upgrade'"
            )

    def start(self) -> None:
        self.prepare_database()
        if self.dicom is not None:
            if removed := self.store.discard_partial_writes():
                log.info("discarded %d partial writes left by an interrupted run", removed)
            self.rules.ensure_seeded(self.settings.routing.rules_file)
        if self.workers is not None:
            self.workers.start()
        if self.dicom is not None:
            self.dicom.start()
        if self.completion is not None:
            self.completion.start()
        if self.supervisor is not None:
            self.supervisor.start()
        if self.exporter is not None:
            self.exporter.start()
        if self.retention is not None:
            self.retention.start()
        if self.settings.web.enabled:
            self._web = WebServer(self, _user_app(self))
            self._web.start()
        if self.role != "web" and self.settings.cluster.internal_port:
            from node.web.internal import create_internal_app

            cluster = self.settings.cluster
            self._internal = WebServer(
                self,
                create_internal_app(self),
                host=cluster.internal_host,
                port=cluster.internal_port,
                name="internal-http",
            )
            self._internal.start()
        elif self.role == "all" and self.settings.cluster.token and self._web is not None:
            log.warning(
                "the internal API (WADO-RS, result upload) shares the user-facing web.port; "
                "set cluster.internal_port to give it a listener of its own"
            )
        log.info("node started role=%s", self.role)

    def stop(self) -> None:
        if self._web is not None:
            self._web.stop()
        if self._internal is not None:
            self._internal.stop()
        if self.completion is not None:
            self.completion.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.exporter is not None:
            self.exporter.stop()
        if self.dicom is not None:
            self.dicom.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.workers is not None:
            self.workers.stop()
        self.engine.dispose()

    # -- health ---------------------------------------------------------------------
    def components(self) -> dict[str, bool]:
        """Whether each long-running part of this role is alive (liveness, /healthz)."""
        parts: dict[str, bool] = {}
        if self.dicom is not None:
            parts["dicom"] = self.dicom.listening
        for name, part in (
            ("completion", self.completion),
            ("supervisor", self.supervisor),
            ("exporter", self.exporter),
            ("retention", self.retention),
        ):
            if part is not None:
                parts[name] = _thread_alive(part)
        if self._web is not None:
            parts["http"] = self._web.alive
        if self._internal is not None:
            parts["internal_http"] = self._internal.alive
        return parts

    def worker_processes(self) -> tuple[int, int]:
        """(running, configured) embedded worker processes; restarted when they die."""
        if self.workers is None:
            return 0, 0
        procs = [p for p in self.workers.processes if p is not None]
        return sum(1 for p in procs if p.poll() is None), self.workers.count

    def readiness(self) -> list[health.Check]:
        """This role's readiness checks by name (/readyz), run side by side, each bounded."""
        store = self.store
        probes: list[health.Probe] = [
            (
                "database",
                health.DATABASE_CHECK_SECONDS,
                lambda: health.database_problems(self.engine),
            ),
            (
                "storage",
                health.STORAGE_CHECK_SECONDS,
                lambda: health.storage_problems(
                    store.tmp_dir, store.free_bytes, self.settings.storage.min_free_bytes
                ),
            ),
        ]
        if self.dicom is not None:
            probes.append(
                ("dicom_listener", health.LISTENER_CHECK_SECONDS, self._listener_problems)
            )
        if self.celery is not None:
            celery = self.celery
            probes.append(
                ("broker", health.BROKER_CHECK_SECONDS, lambda: health.broker_problems(celery))
            )
        return self._checks.run(probes)

    def readiness_problems(self) -> list[str]:
        """Why this role should not get traffic now; empty when ready."""
        return [problem for check in self.readiness() for problem in check.problems]

    def _listener_problems(self) -> list[str]:
        dicom = self.dicom
        if dicom is None or not dicom.listening:
            return ["DICOM listener is not running"]
        if not self.settings.dicom.plain:
            # TLS only: a bare connect would be logged as a refused handshake on every
            # probe; the listener thread serving is what can be said without one.
            return []
        return health.listener_problems(
            self.settings.dicom.host, dicom.port, timeout=health.LISTENER_CHECK_SECONDS / 2
        )

    @property
    def web_url(self) -> str | None:
        return None if self._web is None else self._web.url

    @property
    def internal_url(self) -> str | None:
        """Base URL of the internal API's own listener (cluster.internal_port), if any."""
        return None if self._internal is None else self._internal.url

    @property
    def serves_internal_api_on_web_port(self) -> bool:
        """No internal listener of its own: the dicom and all roles keep the API on web.port."""
        return self.role != "web" and not self.settings.cluster.internal_port

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _user_app(node: Node) -> Any:
    """The app on web.port: the full application, or the dicom role's service app
    (readiness, health, metrics; the internal API only without an internal port)."""
    if node.role != "dicom":
        from node.web.app import create_app

        return create_app(node)
    from fastapi import FastAPI

    from node import __version__
    from node.observability.readiness import readiness_router
    from node.web.internal import internal_router
    from node.web.service import health_router

    service = FastAPI(
        title="triage-node service", version=__version__, openapi_url=None, docs_url=None
    )
    for router in (readiness_router(node), health_router(node)):  # /readyz by check first
        service.include_router(router)
    if node.serves_internal_api_on_web_port:
        service.include_router(internal_router(node))
    return service


def _thread_alive(part: object) -> bool:
    """A node component's worker thread is running (they keep it in ``_thread``)."""
    thread = getattr(part, "_thread", None)
    return isinstance(thread, threading.Thread) and thread.is_alive()


class WebServer:
    """uvicorn in a thread of the node process (the web app never imports TensorFlow).

    One per listener: web.port (the app of the role, :func:`_user_app`) and, with
    cluster.internal_port, the internal API's own. Both use web.tls_* when set.
    """

    def __init__(
        self,
        node: Node,
        app: Any,
        *,
        host: str | None = None,
        port: int | None = None,
        name: str = "web",
    ) -> None:
        import uvicorn

        from node.tls import web_server_context

        settings = node.settings.web
        # Built here, not in the server thread, so a bad certificate stops the start.
        tls_context = web_server_context(settings)
        self._scheme = "http" if tls_context is None else "https"
        config = uvicorn.Config(
            app,
            host=settings.host if host is None else host,
            port=settings.port if port is None else port,
            log_level="warning",
            access_log=False,
            ssl_context_factory=None if tls_context is None else lambda *_: tls_context,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self._server.config.host}:{self.port}/"

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        for _ in range(200):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.025)
        if not self._server.started:
            raise NodeError(
                f"web server did not start on {self._server.config.host}:{self._server.config.port}"
            )

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
