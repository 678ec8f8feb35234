"""The embedded broker's file: settled messages leave it, in-flight ones stay, polls use an index."""

from __future__ import annotations

import hashlib
import inspect
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Message, Producer, Queue
from sqlalchemy import event

from workers import broker

QUEUE_ORDER = ["stat", "urgent", "routine"]


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    broker.prepare_sqlite(url)
    return url


def connect(url: str) -> Connection:
    """A connection as Celery makes it from ``celery_config`` for the embedded broker."""
    return Connection(
        url, transport=broker.Transport, transport_options={"connect_args": {"timeout": 30}}
    )


def publish(url: str, queue: str, *bodies: int) -> None:
    with connect(url) as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, routing_key=queue, serializer="json")


def rows(url: str) -> list[tuple[int, int]]:
    """(row id, visible) of every message row left in the file."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT id, visible FROM kombu_message ORDER BY id").fetchall()


class Worker:
    """One consuming connection taking a message at a time, as ``worker_prefetch_multiplier = 1``."""

    def __init__(self, url: str) -> None:
        self.conn = connect(url)
        self.channel = self.conn.channel()
        self.channel.basic_qos(0, 1, False)
        self.received: list[Message] = []
        self.consumer = Consumer(
            self.channel,
            [Queue(name) for name in QUEUE_ORDER],
            callbacks=[lambda body, message: self.received.append(message)],
            accept=["json"],
        )
        self.consumer.consume()

    def take(self) -> Message:
        """The next message, unsettled."""
        before = len(self.received)
        self.conn.drain_events(timeout=5)
        assert len(self.received) == before + 1
        return self.received[-1]

    def poll_empty(self) -> None:
        """Poll until the timeout: every queue empty (this is when settled rows go)."""
        with pytest.raises(TimeoutError):
            self.conn.drain_events(timeout=0.5)

    def close(self) -> None:
        self.conn.release()


@pytest.fixture
def workers(url: str) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


def test_acknowledged_messages_leave_the_broker_file(url: str, workers: list[Worker]) -> None:
    publish(url, "routine", *range(50))
    worker = Worker(url)
    workers.append(worker)
    for _ in range(50):
        worker.take().ack()
    worker.poll_empty()

    assert [m.payload for m in worker.received] == list(range(50))
    assert rows(url) == []


def test_an_unacknowledged_message_keeps_its_row_and_is_redelivered(
    url: str, workers: list[Worker]
) -> None:
    """A message in flight survives others' acks; given back on close, it comes again once."""
    publish(url, "routine", 1, 2, 3)
    dying = Worker(url)
    workers.append(dying)
    held = dying.take()
    held_row = rows(url)[0]

    other = Worker(url)
    workers.append(other)
    other.take().ack()
    other.take().ack()
    other.poll_empty()
    # A worker killed outright would leave just this: the row of what it held.
    assert rows(url) == [held_row]

    dying.close()  # unacked: published again as a new row, the old one goes
    again = other.take()
    assert (again.payload, again.delivery_tag) == (held.payload, held.delivery_tag)
    assert [visible for _, visible in rows(url)] == [0]
    again.ack()
    other.poll_empty()
    assert rows(url) == []


def test_rejected_messages_leave_and_requeued_ones_come_back(
    url: str, workers: list[Worker]
) -> None:
    publish(url, "routine", 1, 2)
    worker = Worker(url)
    workers.append(worker)
    worker.take().reject()
    requeued = worker.take()
    requeued.requeue()
    again = worker.take()
    assert again.payload == requeued.payload == 2
    assert len(rows(url)) == 1
    again.ack()
    worker.poll_empty()
    assert rows(url) == []


def test_stat_overtakes_routine_after_history(url: str, workers: list[Worker]) -> None:
    worker = Worker(url)
    workers.append(worker)
    publish(url, "routine", *range(20))
    for _ in range(20):
        worker.take().ack()
    publish(url, "routine", 100, 101, 102)
    publish(url, "urgent", 200)
    publish(url, "stat", 300)

    order = []
    for _ in range(5):
        message = worker.take()
        order.append(message.payload)
        message.ack()
    worker.poll_empty()

    assert order == [300, 200, 100, 101, 102]
    assert rows(url) == []


def test_the_poll_query_is_answered_by_an_index(url: str) -> None:
    """The query a poll runs is a search of the poll index with no sort, not a scan."""
    with connect(url) as conn:
        channel = conn.channel()
        engine, _ = channel._open()
        polls: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.lstrip().startswith("SELECT kombu_message."):
                polls.append((statement, params))

        event.listen(engine, "before_cursor_execute", record)
        try:
            assert channel.basic_get("routine") is None
        finally:
            event.remove(engine, "before_cursor_execute", record)

    (statement, params) = polls[-1]
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        plan = " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params))
    assert f"INDEX {broker.POLL_INDEX} (queue_id=? AND visible=?)" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


def test_kombus_get_is_the_one_our_copy_was_derived_from() -> None:
    """``broker.Channel._get`` is kombu's with the row kept and settled rows deleted:
    an upgrade that changes kombu's fails here, so the copy is reviewed, not stale."""
    from kombu.transport.sqlalchemy import Channel as Upstream

    reviewed = "607d403ac8724483"  # pragma: allowlist secret
    digest = hashlib.sha256(inspect.getsource(Upstream._get).encode()).hexdigest()[:16]
    assert digest == reviewed, "kombu's Channel._get changed: review workers/broker.py"
