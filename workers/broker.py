"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, in strict priority order.

kombu's virtual transports poll their queues round-robin (``FairCycle``), so a
STAT message would wait behind routine ones. :class:`PriorityCycle` tries the
queues in the order the worker consumes them (``stat, urgent, routine``) every
time, which is what separate priority queues are for. Redis gets the same
behaviour from its ``queue_order_strategy = "priority"`` option.

kombu's transport keeps every delivered message as a hidden row for good, and each
poll (every queue, every 0.2 s, under SQLite's write lock) walks past all of them:
:class:`Channel` deletes a row once its message is settled, and indexes the poll.

The broker is a delivery mechanism, not the record: a message lost with a
killed worker is re-sent by the node's supervisor when the study's lease expires.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from json import loads
from pathlib import Path
from typing import Any

from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.scheduling import FairCycle
from sqlalchemy import Engine, text, true
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: Use as Celery's ``broker_transport``; the URL is a plain ``sqlite:///`` URL.
TRANSPORT = "workers.broker:Transport"

#: Serves the poll (``queue_id = ? AND visible = 1 ORDER BY timestamp, id``) and the
#: queue-depth count; kombu's own indexes lead with ``visible`` or ``timestamp`` alone.
POLL_INDEX = "ix_kombu_message_poll"

_indexed: set[tuple[str, str]] = set()
_index_lock = threading.Lock()


class PriorityCycle(FairCycle):  # type: ignore[misc]
    """Every poll starts again at the first (most urgent) queue."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        self.pos = 0
        return super().get(callback, **kwargs)


class Channel(SQLAlchemyChannel):  # type: ignore[misc]
    """Deletes a message's row once it is settled: acknowledged, rejected or given back.

    In kombu's transport a delivered row only turns ``visible = 0``, and nothing
    reads it again: a message is redelivered (rejected with requeue, or unacked
    when its channel closes) by publishing the in-memory copy as a new row. So a
    hidden row is bookkeeping, and it is kept exactly while its message is in
    flight; a worker killed outright leaves its row behind, and the supervisor
    re-sends the study. Settling may happen on another thread (kombu's QoS allows
    it), so it only records the row; the consuming thread deletes it inside the
    next poll's write transaction (at most one polling interval later, no extra
    lock round) or when the channel closes. A periodic purge could not tell an
    in-flight row from a finished one; acknowledgement time can.
    """

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        #: Delivery tag -> row id of each message this channel delivered, until settled.
        self._rows: dict[str, int] = {}
        #: Row ids of settled messages, deleted by the consuming thread.
        self._settled: deque[int] = deque()
        self._no_ack_queues: set[str] = set()
        super().__init__(connection, **kwargs)

    def _reset_cycle(self) -> None:
        self._cycle = PriorityCycle(self._get_and_deliver, self._active_queues, Empty)

    def _open(self) -> tuple[Engine, Any]:
        engine, session_factory = super()._open()
        key = (self.connection.client.hostname, self.message_tablename)
        if key not in _indexed:
            with _index_lock:
                if key not in _indexed:
                    _create_poll_index(engine, self.message_tablename)
                    _indexed.add(key)
        return engine, session_factory

    def _get(self, queue: str) -> Any:
        """kombu's ``_get``, plus the row id kept and settled rows deleted in its transaction.

        ``visible = 1`` rather than kombu's ``visible != 0`` (the column is never
        NULL), so that :data:`POLL_INDEX` answers it without sorting.
        """
        queue_id = self._get_or_create(queue).id
        message = self.message_cls
        session: Session = self.session
        if session.bind is not None and session.bind.dialect.name == "sqlite":
            session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            self._delete_settled(session)
            row = (
                session.query(message)
                .with_for_update()
                .filter(message.queue_id == queue_id)
                .filter(message.visible == true())
                .order_by(message.sent_at)
                .order_by(message.id)
                .limit(1)
                .first()
            )
            if row is None:
                raise Empty()
            row.visible = False
            payload = loads(bytes_to_str(row.payload))
            if queue in self._no_ack_queues:
                self._settled.append(row.id)
            else:
                self._rows[payload["properties"]["delivery_tag"]] = row.id
            return payload
        finally:
            session.commit()

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:
            self._settle(message.delivery_tag)
        return message

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._settle(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)
        self._settle(delivery_tag)

    def _restore(self, message: Any) -> None:
        """Given back (requeued, or unacked at close): published again as a new row first."""
        super()._restore(message)
        self._settle(message.delivery_tag)

    def close(self) -> None:
        super().close()
        if self._settled and self._session is not None:
            try:
                self._delete_settled(self._session)
                self._session.commit()
            except OperationalError:
                # Left hidden, never redelivered: only rows, no lost message.
                self._session.rollback()
                log.warning("broker: settled messages left in the broker file on close")

    def _settle(self, delivery_tag: str) -> None:
        row_id = self._rows.pop(delivery_tag, None)
        if row_id is not None:
            self._settled.append(row_id)

    def _delete_settled(self, session: Session) -> None:
        ids: list[int] = []
        while self._settled:
            ids.append(self._settled.popleft())
        if not ids:
            return
        table = self.message_cls.__table__
        try:
            session.execute(table.delete().where(table.c.id.in_(ids)))
        except BaseException:
            self._settled.extend(ids)
            raise


class Transport(SQLAlchemyTransport):  # type: ignore[misc]
    Channel = Channel
    #: Seconds between polls when every queue is empty (latency vs. idle load).
    polling_interval = 0.2


def _create_poll_index(engine: Engine, tablename: str) -> None:
    """Add :data:`POLL_INDEX` to the table kombu creates from its own models."""
    quote = engine.dialect.identifier_preparer.quote
    ddl = (
        f"CREATE INDEX IF NOT EXISTS {quote(POLL_INDEX)} "
        f"ON {quote(tablename)} (queue_id, visible, timestamp, id)"
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(ddl)


def prepare_sqlite(url: str) -> None:
    """Create the broker file in WAL mode so the node and workers do not block each other."""
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
