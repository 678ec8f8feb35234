"""The running node: wires settings, database, store, DICOM listener, completion and web.

``triage-node serve`` builds one :class:`Node`; tests build them too, on free
ports and temporary data directories.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.completion import CompletionHook, CompletionMonitor
from node.config import Settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.errors import NodeError
from node.export.exporter import Exporter
from node.ingest.callers import CallerPolicy
from node.ingest.limits import BacklogGauge, IngestLimits, count_backlog
from node.ingest.scp import DicomServer, StoreSCP
from node.pipeline import Pipeline, PipelineSupervisor
from node.retention import Retention, RetentionMonitor
from node.routing.store import RuleStore
from node.storage import InstanceStore
from node.worker_processes import WorkerProcesses

log = logging.getLogger(__name__)


class SchemaOutOfDate(NodeError):
    """The database schema is behind the code and auto-upgrade is off."""


class Node:
    """One node process (the all-in-one mode, or the DICOM role of a larger site)."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        completion_hooks: Sequence[CompletionHook] = (),
        pipeline: bool = True,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.engine: Engine = make_engine(
            settings.database_url, durable=settings.storage.fsync, echo=settings.database.echo
        )
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.store = InstanceStore(
            settings.storage.data_dir,
            min_free_bytes=settings.storage.min_free_bytes,
            fsync=settings.storage.fsync,
        )
        self.catalog = Catalog(self.sessions)
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
        self.rules = RuleStore(
            self.sessions, known_destinations=[d.name for d in settings.destinations]
        )
        self.exporter = Exporter(settings, self.sessions, self.store)
        retention = Retention(settings.retention, self.sessions, self.store)
        self.retention = RetentionMonitor(retention) if retention.enabled else None
        self.pipeline: Pipeline | None = None
        self.supervisor: PipelineSupervisor | None = None
        self.workers: WorkerProcesses | None = None
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
        self._web: WebServer | None = None

    def prepare_database(self) -> None:
        if self.settings.database.auto_upgrade:
            migrate.upgrade(self.engine)
        elif not migrate.is_up_to_date(self.engine):
            raise SchemaOutOfDate(
                "database schema is not at the current revision; run 'triage-node db upgrade'"
            )

    def start(self) -> None:
        self.prepare_database()
        if removed := self.store.discard_partial_writes():
            log.info("discarded %d partial writes left by an interrupted run", removed)
        self.rules.ensure_seeded(self.settings.routing.rules_file)
        if self.workers is not None:
            self.workers.start()
        self.dicom.start()
        self.completion.start()
        if self.supervisor is not None:
            self.supervisor.start()
        self.exporter.start()
        if self.retention is not None:
            self.retention.start()
        if self.settings.web.enabled:
            self._web = WebServer(self)
            self._web.start()

    def stop(self) -> None:
        if self._web is not None:
            self._web.stop()
        self.completion.stop()
        if self.retention is not None:
            self.retention.stop()
        self.exporter.stop()
        self.dicom.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.workers is not None:
            self.workers.stop()
        self.engine.dispose()

    @property
    def web_url(self) -> str | None:
        if self._web is None:
            return None
        scheme = "https" if self.settings.web.tls_certificate is not None else "http"
        return f"{scheme}://{self.settings.web.host}:{self._web.port}/"

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


class WebServer:
    """uvicorn in a thread of the node process (the web app never imports TensorFlow)."""

    def __init__(self, node: Node) -> None:
        import uvicorn

        from node.tls import web_server_context
        from node.web.app import create_app

        settings = node.settings.web
        # Built here, not in the server thread, so a bad certificate stops the start.
        tls_context = web_server_context(settings)
        config = uvicorn.Config(
            create_app(node),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            ssl_context_factory=None if tls_context is None else lambda *_: tls_context,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

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
