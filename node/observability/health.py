"""Readiness checks shared by the node roles and the workers.

Each check returns the reasons it is not ready (an empty list when it is). The
reasons name components and exception types, never URLs with credentials or data.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from sqlalchemy import Engine

from node.db import migrate


@functools.cache
def _head_revision() -> str | None:
    return migrate.head_revision()


def database_problems(engine: Engine) -> list[str]:
    """The database answers and its schema is at the code's revision."""
    try:
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
