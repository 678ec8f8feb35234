"""Engines and sessions for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

#: Execution option for a connection that only reads: on SQLite its transactions begin
#: DEFERRED (no write lock, so it never waits for the ingest writers); ignored elsewhere.
READ_ONLY = "triage_read_only"


def make_engine(url: str, *, durable: bool = True, echo: bool = False) -> Engine:
    """Create an engine tuned for many short write transactions from the SCP threads.

    SQLite runs in WAL mode; transactions start with ``BEGIN IMMEDIATE`` so
    concurrent writers queue on the busy timeout instead of failing on a lock
    upgrade. Connections with the :data:`READ_ONLY` execution option begin
    DEFERRED instead: they read a snapshot and neither wait for nor block a writer.
    ``durable`` makes SQLite fsync the WAL on every commit (``synchronous=FULL``):
    an acknowledged instance survives power loss, not only a killed process.
    Bound parameters are hidden from exception text and ``echo`` output: a query's
    parameters may be a patient ID (worklist search), and errors reach the logs.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url,
            echo=echo,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
        )

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        echo=echo,
        hide_parameters=True,
        connect_args={"timeout": 30, "check_same_thread": False},
    )
    synchronous = "FULL" if durable else "NORMAL"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A reader marked ``read_only`` reads a WAL snapshot without the write lock.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
