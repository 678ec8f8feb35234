"""Nodes under test: in-process (fast, inspectable) or as a real ``triage-node serve`` process."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
CLI = Path(sys.executable).with_name("triage-node")
#: The PostgreSQL server of these machines; the test command starts it when down.
POSTGRES_ADMIN_URL = os.environ.get(
    "TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextlib.contextmanager
def postgres_database(prefix: str = "triage_test") -> Iterator[str]:
    """A fresh database on the local PostgreSQL server (its URL), dropped at the end."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def wait_for_study(node: Any, uid: str, states: set[Any], timeout: float = 120) -> Any:
    """Poll the node's database until study ``uid`` is in one of ``states``; show worker logs if not."""
    from sqlalchemy import select

    from node.db.models import Study

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with node.sessions() as session:
            study = session.execute(
                select(Study).where(Study.study_instance_uid == uid)
            ).scalar_one_or_none()
        if study is not None and study.status in states:
            return study
        time.sleep(0.1)
    logs = "".join(p.read_text()[-3000:] for p in (node.store.data_dir / "logs").glob("*.log"))
    raise AssertionError(f"study {uid} not in {states} after {timeout} s; worker logs:\n{logs}")


def wait_done(node: Any, uid: str, timeout: float = 180) -> Any:
    """Wait until the study is processed, and fail with its reason if it failed."""
    from node.db.models import StudyStatus

    study = wait_for_study(node, uid, {StudyStatus.DONE, StudyStatus.FAILED}, timeout)
    assert study.status == StudyStatus.DONE, study.status_reason
    return study


def write_config(path: Path, data: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(data))
    return path


class NodeProcess:
    """``triage-node serve`` in its own process, for kill -9 and restart tests."""

    def __init__(self, config: Path, dicom_port: int, log: Path) -> None:
        self.config = config
        self.dicom_port = dicom_port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(CLI), "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_for_port(self.dicom_port)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
