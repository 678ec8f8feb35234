"""Readiness checks shared by the node roles and the workers.

Each check returns the reasons it is not ready (an empty list when it is). The
reasons name components and exception types, never URLs with credentials or data.
:class:`BoundedChecks` runs named checks side by side, each within its time limit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from node.db import migrate

#: Time limits of the readiness checks (seconds). The checks run side by side, so a
#: probe answers within the longest, under the 10 s of the images' HEALTHCHECK.
DATABASE_CHECK_SECONDS = 3.0
STORAGE_CHECK_SECONDS = 3.0
LISTENER_CHECK_SECONDS = 2.0
BROKER_CHECK_SECONDS = 5.0

#: (name, seconds it may take, the check): what :meth:`BoundedChecks.run` runs.
Probe = tuple[str, float, Callable[[], list[str]]]


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one named readiness check; no problems: it passed."""

    name: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": True} if self.ok else {"ok": False, "detail": "; ".join(self.problems)}


class BoundedChecks:
    """Runs checks in threads of their own, side by side, each within its time limit.

    A database or broker that does not answer (packets dropped by a firewall, a server
    stuck) must fail readiness in time rather than hold the probe past the
    orchestrator's timeout. A check still stuck from an earlier request is reported as
    such and not started again, so stuck checks cannot pile up threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}

    def run(self, probes: Sequence[Probe]) -> list[Check]:
        started: list[tuple[str, float, threading.Thread | None, list[list[str]]]] = []
        with self._lock:
            for name, seconds, probe in probes:
                result: list[list[str]] = []
                earlier = self._running.get(name)
                if earlier is not None and earlier.is_alive():
                    started.append((name, seconds, None, result))
                    continue
                thread = threading.Thread(
                    target=_collect, args=(name, probe, result), name=f"ready-{name}", daemon=True
                )
                self._running[name] = thread
                thread.start()
                started.append((name, seconds, thread, result))
        begun = time.monotonic()
        checks: list[Check] = []
        for name, seconds, running, result in started:
            if running is None:
                checks.append(Check(name, (f"{name} check of an earlier request still waiting",)))
                continue
            running.join(max(0.0, begun + seconds - time.monotonic()))
            if not result:
                checks.append(Check(name, (f"{name} did not answer within {seconds:g} s",)))
            else:
                checks.append(Check(name, tuple(result[0])))
        return checks


def _collect(name: str, probe: Callable[[], list[str]], result: list[list[str]]) -> None:
    try:
        result.append(probe())
    except Exception as exc:
        result.append([f"{name} check failed: {type(exc).__name__}"])


@functools.cache
def _head_revision() -> str | None:
    return migrate.head_revision()


def database_problems(engine: Engine) -> list[str]:
    """The database answers and its schema is at the code's revision."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        current = migrate.current_revision(engine)
    except Exception as exc:
        return [f"database unreachable: {type(exc).__name__}"]
    if current != _head_revision():
        return [f"database schema at {current or '(empty)'}, code needs {_head_revision()}"]
    return []


def broker_problems(celery: Any) -> list[str]:
    """A fresh connection to the Celery broker can be opened."""
    try:
        with celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        return [f"broker unreachable: {type(exc).__name__}"]
    return []


def disk_problems(free_bytes: int, min_free_bytes: int) -> list[str]:
    if free_bytes <= min_free_bytes:
        return [f"disk free {free_bytes} bytes, at or below storage.min_free_bytes"]
    return []


def storage_problems(
    tmp_dir: Path, free_bytes: Callable[[], int], min_free_bytes: int
) -> list[str]:
    """Room above ``storage.min_free_bytes``, and a small file can be written and synced.

    Free space says nothing of a volume remounted read-only or a folder that is gone:
    the write goes through the store's own temp folder, as every received instance does.
    """
    try:
        problems = disk_problems(free_bytes(), min_free_bytes)
    except OSError as exc:
        return [f"storage unreadable: {type(exc).__name__}: {exc.strerror}"]
    probe = tmp_dir / f".ready-{secrets.token_hex(4)}.probe"
    try:
        with probe.open("xb") as f:
            f.write(b"ready")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        problems.append(f"storage not writable: {type(exc).__name__}: {exc.strerror}")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return problems


def listener_problems(host: str, port: int, timeout: float = 1.0) -> list[str]:
    """The listener on ``host``:``port`` accepts a TCP connection (closed at once).

    A thread that is alive says nothing of a socket that stopped accepting. A bare
    connect sends no PDU: pynetdicom drops it without an association or a log line.
    """
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104 # nosec B104
        host, host
    )
    try:
        with socket.create_connection((target, port), timeout=timeout):
            pass
    except OSError as exc:
        return [f"DICOM listener not accepting connections on port {port}: {type(exc).__name__}"]
    return []


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
