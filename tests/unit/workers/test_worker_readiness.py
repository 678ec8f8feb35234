"""The worker's /readyz names its checks and answers in time when the database does not."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import Settings
from tests.conftest import node_config
from workers.health import WorkerHealth


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose accept queue is full: connections are neither taken nor refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.settimeout(0.5)
        with contextlib.suppress(OSError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in (*fillers, listener):
        s.close()


def test_readiness_names_each_check_and_bounds_the_database(
    tmp_path: Path, silent_port: int
) -> None:
    url = f"postgresql+psycopg://triage@127.0.0.1:{silent_port}/triage"
    settings = Settings.model_validate(
        node_config(tmp_path, database_url=url, worker={"storage": "shared"})
    )
    probes = WorkerHealth(object(), settings, "127.0.0.1", 0)
    try:
        probes.ready.set()
        started = time.monotonic()
        code, body = probes.readiness()
        assert time.monotonic() - started < 8
    finally:
        probes.stop()
    assert code == 503
    checks = body["checks"]
    assert set(checks) == {"consuming", "broker", "database", "models", "storage"}
    assert checks["consuming"] == {"ok": True}
    assert checks["database"] == {"ok": False, "detail": "database did not answer within 3 s"}
    assert checks["broker"]["ok"] is False  # no broker at all here
    assert "database did not answer within 3 s" in body["reasons"]
