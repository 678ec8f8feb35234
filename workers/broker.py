"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file, in strict priority order.

kombu's virtual transports poll their queues round-robin (``FairCycle``), so a
STAT message would wait behind routine ones. :class:`PriorityCycle` tries the
queues in the order the worker consumes them (``stat, urgent, routine``) every
time, which is what separate priority queues are for. Redis gets the same
behaviour from its ``queue_order_strategy = "priority"`` option.

The broker is a delivery mechanism, not the record: a message lost with a
killed worker is re-sent by the node's supervisor when the study's lease expires.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from kombu.transport.sqlalchemy import Channel as SQLAlchemyChannel
from kombu.transport.sqlalchemy import Transport as SQLAlchemyTransport
from kombu.transport.virtual import Empty
from kombu.utils.scheduling import FairCycle

#: Use as Celery's ``broker_transport``; the URL is a plain ``sqlite:///`` URL.
TRANSPORT = "workers.broker:Transport"


class PriorityCycle(FairCycle):  # type: ignore[misc]
    """Every poll starts again at the first (most urgent) queue."""

    def get(self, callback: Any, **kwargs: Any) -> Any:
        self.pos = 0
        return super().get(callback, **kwargs)


class Channel(SQLAlchemyChannel):  # type: ignore[misc]
    def _reset_cycle(self) -> None:
        self._cycle = PriorityCycle(self._get_and_deliver, self._active_queues, Empty)


class Transport(SQLAlchemyTransport):  # type: ignore[misc]
    Channel = Channel
    #: Seconds between polls when every queue is empty (latency vs. idle load).
    polling_interval = 0.2


def prepare_sqlite(url: str) -> None:
    """Create the broker file in WAL mode so the node and workers do not block each other."""
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
