"""Shared pieces of the fault tests: private servers we may kill, workers, senders, checks.

Every server a fault test kills or restarts is its own (a private Redis or
PostgreSQL on a free loopback port, a tmpfs), never the machine's shared ones.
The checks read the node's database and data directory, so what they prove does
not depend on how a fault happened to land.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import Engine, create_engine, select

from node.db.models import Finding, Instance, Study, StudyStatus
from tests.conftest import node_config
from tests.dicomgen import cxr_from_jpeg
from tests.nodes import SHARED_DATA, free_port, wait_for_port
from tests.peers import storescu, storescu_responses

#: Chest CR/DX to the classifier only (fast); the worker-kill test adds the U-Net.
CLASSIFIER_RULES = """
format = 1
[[rule]]
name = "chest"
priority = "routine"
models = ["pneumonia-triage"]
destinations = []
[rule.match]
Modality = ["CR", "DX"]
BodyPartExamined = "CHEST"
"""


def fault_config(
    tmp_path: Path,
    *,
    database_url: str | None = None,
    rules: str = CLASSIFIER_RULES,
    **sections: Any,
) -> dict[str, Any]:
    """A node config for fault tests: short quiet time, short leases, fast retries."""
    rules_path = tmp_path / "rules.toml"
    rules_path.write_text(rules)
    base: dict[str, dict[str, Any]] = {
        "study": {"quiet_seconds": 1.0, "check_interval_seconds": 0.2},
        "routing": {"rules_file": str(rules_path)},
        "pipeline": {"workers": 0, "lease_seconds": 15, "retry_backoff_seconds": 0.5},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return node_config(tmp_path, database_url, **base)


def cxr_study(directory: Path, count: int, *, offset: int = 0) -> tuple[str, list[Path]]:
    """One CR chest study of ``count`` distinct 224x224 images (``offset`` picks other JPEGs)."""
    jpegs = sorted((SHARED_DATA / "cxr-pneumonia" / "val" / "NORMAL").glob("*.jpeg"))
    chosen = jpegs[offset : offset + count]
    assert len(chosen) == count, "not enough val/NORMAL images for this study"
    study_uid: str | None = None
    paths = []
    for i, jpeg in enumerate(chosen):
        path = directory / f"img{i:03d}.dcm"
        study_uid, _ = cxr_from_jpeg(jpeg, path, study_uid=study_uid, accession=f"F{offset:05d}")
        paths.append(path)
    assert study_uid is not None
    return study_uid, paths


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send(port: int, files: list[Path]) -> dict[Path, str]:
    """C-STORE ``files`` in one association with storescu; file -> response status text."""
    result = storescu(port, files)
    return dict(storescu_responses(result.stdout + result.stderr))


def send_until_acknowledged(
    port: int, files: list[Path], *, timeout: float = 180, pause: float = 0.3
) -> None:
    """Re-send what was not acknowledged, as a modality does, until all is (or time runs out)."""
    pending = list(files)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} instances never acknowledged"
        answers = send(port, pending)
        pending = [f for f in pending if answers.get(f) != "Success"]
        if pending:
            time.sleep(pause)


class WorkerProcess:
    """``triage-node worker`` in its own process group (Celery parent plus pool child)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, "TRIAGE_NODE_CONFIG": str(self.config), "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Warm shutdown (the running task finishes); SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def worker_processes() -> Iterator[Callable[[Path, Path], WorkerProcess]]:
    """Start ``triage-node worker`` processes; all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def _start(config: Path, log: Path) -> WorkerProcess:
        worker = WorkerProcess(config, log).start()
        started.append(worker)
        return worker

    yield _start
    for worker in started:
        worker.stop()


# -- private servers -------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of our own on a free port: ours to kill -9 and start again."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        redis_server = shutil.which("redis-server")
        assert redis_server, "redis-server not found (Debian package redis-server)"
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    redis_server,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if self.appendonly else "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def _postgres_bin(tool: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))
    assert found, f"{tool} not found under /usr/lib/postgresql (Debian package postgresql)"
    return str(found[-1])


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temp dir, run as the ``postgres`` user).

    PostgreSQL refuses to run as root, and pytest's tmp_path is not reachable for
    another user, so the cluster lives in its own directory under /tmp.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = free_port()
        self.sockets.mkdir()
        shutil.chown(self.root, "postgres")
        shutil.chown(self.sockets, "postgres")
        self.root.chmod(0o755)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/triage"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init(self) -> PrivatePostgres:
        self._as_postgres(
            _postgres_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"
        )
        self.start()
        admin = create_engine(
            self.url.replace("/triage", "/postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE triage")
        admin.dispose()
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=200"
        )
        self._as_postgres(
            _postgres_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    _postgres_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        yield server.init()
    finally:
        server.remove()


# -- checks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyRecord:
    status: StudyStatus
    version: int
    attempts: int
    reason: str | None
    instances: dict[str, str]  # SOPInstanceUID -> relative path


def read_studies(engine: Engine) -> dict[str, StudyRecord]:
    """Every study in the node's database with its instances."""
    with engine.connect() as conn:
        studies = conn.execute(
            select(Study.id, Study.study_instance_uid, Study.status, Study.version)
            .add_columns(Study.attempts, Study.status_reason)
            .order_by(Study.id)
        ).all()
        rows = conn.execute(
            select(Instance.study_id, Instance.sop_instance_uid, Instance.path)
        ).all()
    out = {}
    for s in studies:
        out[s.study_instance_uid] = StudyRecord(
            StudyStatus(s.status),
            s.version,
            s.attempts,
            s.status_reason,
            {r.sop_instance_uid: r.path for r in rows if r.study_id == s.id},
        )
    return out


def wait_study_status(
    engine: Engine, uid: str, states: set[StudyStatus], timeout: float = 180
) -> StudyRecord:
    """Poll until study ``uid`` is in one of ``states``."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        study = read_studies(engine).get(uid)
        if study is not None and study.status in states:
            return study
        time.sleep(0.1)
    raise AssertionError(f"study {uid} not in {states} after {timeout} s: {study}")


def wait_all_done(engine: Engine, uids: set[str], timeout: float = 240) -> dict[str, StudyRecord]:
    """Poll until every study in ``uids`` is done (failed ones fail the test at once)."""
    deadline = time.monotonic() + timeout
    studies: dict[str, StudyRecord] = {}
    while time.monotonic() < deadline:
        studies = read_studies(engine)
        failed = {u: s.reason for u, s in studies.items() if s.status == StudyStatus.FAILED}
        assert not failed, f"studies failed: {failed}"
        if all(u in studies and studies[u].status == StudyStatus.DONE for u in uids):
            return studies
        time.sleep(0.25)
    states = {u: (s.status.value, s.version, s.reason) for u, s in studies.items()}
    raise AssertionError(f"not all studies done after {timeout} s: {states}")


def assert_stored_once(
    data_dir: Path, engine: Engine, acknowledged: dict[str, Path], *, exact: bool = False
) -> None:
    """Each acknowledged instance is in the database once and whole on disk; no strays.

    ``acknowledged`` maps SOPInstanceUID to the file that was sent. With ``exact``
    the database holds nothing else: every row is an acknowledged instance (an
    instance answered with a failure status must have left no row behind).
    """
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    counts = Counter(r.sop_instance_uid for r in rows)
    assert [u for u, n in counts.items() if n > 1] == []
    paths = {r.sop_instance_uid: r.path for r in rows}
    if exact:
        unacknowledged = sorted(set(paths) - set(acknowledged))
        assert unacknowledged == [], f"rows for instances never acknowledged: {unacknowledged}"
    for uid, sent in acknowledged.items():
        assert uid in paths, f"acknowledged {sent.name} missing from the database"
        stored = dcmread(data_dir / paths[uid])
        original = dcmread(sent)
        assert stored.SOPInstanceUID == uid
        assert stored.PixelData == original.PixelData, f"{sent.name} stored damaged"
    on_disk = {p.relative_to(data_dir).as_posix() for p in (data_dir / "instances").rglob("*.dcm")}
    assert on_disk == set(paths.values()), "files without rows, or rows without files"
    assert list((data_dir / "tmp").iterdir()) == [], "temporary files left behind"


def assert_processed_once(
    engine: Engine,
    data_dir: Path,
    studies: dict[str, StudyRecord],
    uids: set[str],
    *,
    kinds: set[str],
) -> None:
    """Findings of every version at most once per image, and the final version complete.

    Final version: exactly the finding ``kinds`` the rule's models produce
    ({"classification"} for the classifier, plus "segmentation" with the U-Net),
    one per-image finding of each kind for each of the study's instances, one
    study summary (classification), and one SR plus one heatmap image per instance on disk.
    """
    ids = {}
    with engine.connect() as conn:
        for uid, in_db in conn.execute(select(Study.study_instance_uid, Study.id)).all():
            ids[uid] = in_db
        findings = conn.execute(
            select(
                Finding.study_id,
                Finding.study_version,
                Finding.kind,
                Finding.model_name,
                Finding.sop_instance_uid,
                Finding.frame_number,
            )
        ).all()
    per_key = Counter(tuple(f) for f in findings)
    assert [k for k, n in per_key.items() if n > 1] == [], "duplicated findings"
    for uid in uids:
        study = studies[uid]
        final = [f for f in findings if f.study_id == ids[uid] and f.study_version == study.version]
        found = {f.kind for f in final}
        assert found == kinds, f"study {uid} v{study.version}: finding kinds {found} != {kinds}"
        for kind in found:
            per_image = sorted(
                f.sop_instance_uid for f in final if f.kind == kind and f.sop_instance_uid
            )
            assert per_image == sorted(study.instances), f"study {uid} v{study.version} {kind}"
        assert len([f for f in final if f.sop_instance_uid is None]) == 1  # the study summary
        results = data_dir / "results" / uid / f"v{study.version}"
        assert len(list((results / "sr").glob("*.dcm"))) == 1
        assert len(list((results / "sc").glob("*.dcm"))) == len(study.instances)
