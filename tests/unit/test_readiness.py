"""/readyz names each check: the listener accepts, the database answers in time, the
store takes a write and has room. A check that does not answer is a failed check."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Callable

import httpx
from sqlalchemy import create_engine

from node.observability import health
from node.runtime import Node
from tests.nodes import free_port


def _ready(node: Node) -> httpx.Response:
    assert node.web_url is not None
    return httpx.get(node.web_url + "readyz", timeout=30)


def test_ready_node_reports_every_check_by_name(start_node: Callable[..., Node]) -> None:
    node = start_node(web={"enabled": True})
    ready = _ready(node)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert {"database", "storage", "dicom_listener", "broker"} <= set(checks)
    assert all(check == {"ok": True} for check in checks.values()), checks


def test_monitors_may_probe_with_head(start_node: Callable[..., Node]) -> None:
    """Load balancers and uptime monitors often send HEAD: same status, no body."""
    node = start_node(web={"enabled": True})
    assert node.web_url is not None
    for path in ("healthz", "readyz"):
        answer = httpx.head(node.web_url + path, timeout=30)
        assert answer.status_code == 200 and answer.content == b"", (path, answer.status_code)


def test_store_that_cannot_be_written_is_not_ready(start_node: Callable[..., Node]) -> None:
    """Free space alone says nothing of a read-only or broken store (runs as root too:
    the temp folder is replaced by a file, so no permission bit is involved)."""
    node = start_node(web={"enabled": True})
    shutil.rmtree(node.store.tmp_dir)
    node.store.tmp_dir.write_bytes(b"")
    try:
        ready = _ready(node)
        assert ready.status_code == 503
        storage = ready.json()["checks"]["storage"]
        assert storage["ok"] is False and "not writable" in storage["detail"]
        assert ready.json()["checks"]["database"] == {"ok": True}
    finally:
        node.store.tmp_dir.unlink()
        node.store.tmp_dir.mkdir()
    assert _ready(node).status_code == 200


def test_low_disk_is_a_failed_storage_check(start_node: Callable[..., Node]) -> None:
    node = start_node(web={"enabled": True}, storage={"min_free_bytes": 2**62})
    ready = _ready(node)
    assert ready.status_code == 503
    assert "storage.min_free_bytes" in ready.json()["checks"]["storage"]["detail"]


def test_stopped_listener_fails_its_check(start_node: Callable[..., Node]) -> None:
    node = start_node(web={"enabled": True})
    assert node.dicom is not None
    node.dicom.stop()
    ready = _ready(node)
    assert ready.status_code == 503
    assert ready.json()["checks"]["dicom_listener"] == {
        "ok": False,
        "detail": "DICOM listener is not running",
    }


def test_listener_check_connects() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        anywhere = "0.0.0.0"  # nosec B104
        assert health.listener_problems(anywhere, listener.getsockname()[1]) == []
    (problem,) = health.listener_problems("127.0.0.1", free_port())
    assert problem.startswith("DICOM listener not accepting connections")


def test_database_that_never_answers_fails_within_the_limit() -> None:
    """A server behind a firewall that drops packets: the check answers in its time."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped
        filler = socket.socket()
        filler.settimeout(0.5)
        with contextlib.suppress(OSError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    engine = create_engine(f"postgresql+psycopg://triage@127.0.0.1:{port}/triage")
    probes = health.BoundedChecks()
    try:
        started = time.monotonic()
        (check,) = probes.run([("database", 1.0, lambda: health.database_problems(engine))])
        assert time.monotonic() - started < 3
        assert check.name == "database" and not check.ok
        assert check.problems == ("database did not answer within 1 s",)
        # Asked again while the first is still stuck: reported, no second thread.
        (again,) = probes.run([("database", 1.0, lambda: health.database_problems(engine))])
        assert not again.ok and "still" in again.problems[0]
    finally:
        for s in (*fillers, listener):
            s.close()
        engine.dispose()
