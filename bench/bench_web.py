"""Web benchmark: worklist API and page latency with 100 000 studies, SQLite and PostgreSQL.

Run from the repository root::

    .venv/bin/python bench/bench_web.py [--studies 100000] [--requests 200]
                                        [--backends sqlite,postgresql]

For each database the node starts as ``serve`` runs it (migrations, the web app
under uvicorn on a free port, pipeline workers off) on an empty database, then
``--studies`` studies are bulk-inserted with findings (Core ``executemany`` in
batches: a realistic mix of priorities, statuses, scores, modalities, read state
over 90 days; two findings per scored study), an admin logs in over HTTP, and each
request below is timed ``--requests`` times after a warm-up, one at a time, from
an httpx client on the loopback. Every worklist request also writes its audit event,
as in production. Target: p99 < 100 ms for the first page, filtered or not.

PostgreSQL: the server of these machines (``TRIAGE_TEST_POSTGRES_URL``, as the
tests); a throw-away database is created and dropped.

Exit status: 0 measured (whether or not the target was met), 2 the benchmark failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from harness import REPO, BenchError, console, free_port, machine_description, percentile
from harness import write_json as save_json
from rich.table import Table
from sqlalchemy import insert, text

sys.path.insert(0, str(REPO))  # the PostgreSQL helper of the tests, not a copy of it
from node.config import Settings
from node.db.models import Finding, Priority, Role, Study, StudyMark, StudyStatus
from node.runtime import Node
from node.users.accounts import Accounts
from tests.nodes import postgres_database

RESULTS = REPO / "bench" / "results" / "web.json"
TARGET_MS = 100.0
PASSWORD = "bench-password-123"
BATCH = 10_000


@dataclass(frozen=True)
class Measurement:
    backend: str
    request: str
    path: str
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def ok(self) -> bool:
        return self.p99_ms < TARGET_MS


# -- databases ---------------------------------------------------------------------------
@contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'bench.db'}"
        return
    with postgres_database("triage_bench") as url:
        yield url


def start_node(url: str, folder: Path) -> Node:
    settings = Settings.model_validate(
        {
            "dicom": {"host": "127.0.0.1", "port": free_port()},
            "storage": {"data_dir": str(folder / "var"), "min_free_bytes": 0},
            "database": {"url": url},
            "web": {"enabled": True, "port": free_port()},
            "pipeline": {"workers": 0},
        }
    )
    node = Node(settings)
    node.start()
    return node


# -- data ----------------------------------------------------------------------------------
STATUS_MIX = [
    (StudyStatus.DONE, 0.86),
    (StudyStatus.QUEUED, 0.04),
    (StudyStatus.PROCESSING, 0.01),
    (StudyStatus.FAILED, 0.02),
    (StudyStatus.NOT_ROUTED, 0.05),
    (StudyStatus.RECEIVING, 0.02),
]


def study_rows(n: int, rng: random.Random) -> Iterator[tuple[dict[str, Any], bool]]:
    """(study row, scored?) for ``n`` studies received over the last 90 days."""
    now = datetime.now(UTC)
    statuses, weights = zip(*STATUS_MIX, strict=True)
    for i in range(n):
        received = now - timedelta(seconds=rng.uniform(0, 90 * 86400))
        status = rng.choices(statuses, weights)[0]
        scored = status == StudyStatus.DONE and rng.random() < 0.95
        score = rng.random() if scored else None
        base = rng.choices([Priority.STAT, Priority.URGENT, Priority.ROUTINE], [0.02, 0.08, 0.90])[
            0
        ]
        priority = max(base, Priority.URGENT) if score is not None and score >= 0.9 else base
        read = status == StudyStatus.DONE and received < now - timedelta(days=1)
        yield (
            {
                "study_instance_uid": f"1.2.826.0.1.3680043.10.1234.9.{i}",
                "accession_number": f"A{i:08d}",
                "patient_id": f"P{rng.randrange(30_000):06d}",
                "patient_name": f"Bench^Patient{i}",
                "study_description": "XR CHEST PA",
                "modalities": rng.choices(["CR", "DX", "CT", "CR\\DX"], [0.5, 0.35, 0.1, 0.05])[0],
                "calling_ae_title": "STORESCU",
                "status": str(status),
                "priority": int(priority),
                "base_priority": int(base),
                "version": 1,
                "series_count": 1,
                "instance_count": 1,
                "size_bytes": 2_000_000,
                "first_received_at": received,
                "last_received_at": received,
                "finished_at": received + timedelta(seconds=5) if scored else None,
                "key_finding": None
                if score is None
                else ("pneumonia" if score >= 0.5 else "normal"),
                "key_score": score,
                "read_at": received + timedelta(hours=2) if read else None,
                "read_by": "rad" if read else None,
            },
            scored,
        )


def bulk_insert(node: Node, n: int, seed: int = 7) -> float:
    """Insert ``n`` studies and their findings; return the seconds it took."""
    rng = random.Random(seed)
    started = time.perf_counter()
    rows = study_rows(n, rng)
    next_id = 1
    while True:
        batch = [r for _, r in zip(range(BATCH), rows, strict=False)]
        if not batch:
            break
        studies = []
        findings = []
        marks = []
        for row, scored in batch:
            row["id"] = next_id
            studies.append(row)
            if row["read_by"]:
                # As the web app records a read: the first reader on the study, every
                # reader in study_marks (what the worklist shows).
                marks.append(
                    {
                        "study_id": next_id,
                        "mark": "read",
                        "user_name": row["read_by"],
                        "marked_at": row["read_at"],
                    }
                )
            if scored:
                for sop in (None, f"{row['study_instance_uid']}.1.1"):
                    findings.append(
                        {
                            "study_id": next_id,
                            "study_version": 1,
                            "sop_instance_uid": sop,
                            "model_name": "pneumonia-triage",
                            "model_version": "1.0.0",
                            "kind": "classification",
                            "label": row["key_finding"],
                            "probability": row["key_score"],
                            "created_at": row["finished_at"],
                        }
                    )
            next_id += 1
        with node.engine.begin() as conn:
            conn.execute(insert(Study.__table__), studies)
            if findings:
                conn.execute(insert(Finding.__table__), findings)
            if marks:
                conn.execute(insert(StudyMark.__table__), marks)
    with node.engine.begin() as conn:
        if node.engine.dialect.name == "postgresql":
            conn.execute(text("SELECT setval('studies_id_seq', (SELECT max(id) FROM studies))"))
            conn.execute(text("ANALYZE"))
        else:
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


# -- requests --------------------------------------------------------------------------------
def requests_to_time(rng: random.Random, n: int) -> list[tuple[str, str]]:
    recent = (datetime.now(UTC) - timedelta(days=7)).date().isoformat()
    accession = f"A{rng.randrange(n):08d}"
    return [
        ("API first page", "/api/worklist"),
        ("API status=queued", "/api/worklist?status=queued"),
        ("API status=failed", "/api/worklist?status=failed"),
        ("API priority=stat", "/api/worklist?priority=2"),
        ("API modality=CT", "/api/worklist?modality=CT"),
        ("API unread", "/api/worklist?unread=true"),
        ("API last 7 days", f"/api/worklist?received_from={recent}"),
        ("API search accession", f"/api/worklist?q={accession}"),
        ("API page 20", "/api/worklist?offset=1000"),
        ("API fingerprint (poll)", "/api/worklist/fingerprint"),
        ("page /", "/"),
        ("page status=queued", "/?status=queued"),
        ("page search", f"/?q={accession}"),
        ("page rows (poll reload)", "/worklist/rows"),
    ]


def measure(backend: str, node: Node, n_studies: int, repeats: int) -> list[Measurement]:
    Accounts(node.sessions).add("bench-admin", PASSWORD, Role.ADMIN)
    base = (node.web_url or "").rstrip("/")
    out = []
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/api/session", json={"name": "bench-admin", "password": PASSWORD})
        if r.status_code != 200:
            raise BenchError(f"login failed: {r.status_code} {r.text[:200]}")
        client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
        for label, path in requests_to_time(random.Random(11), n_studies):
            for _ in range(5):  # warm-up: connections, statement caches
                client.get(path).raise_for_status()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                client.get(path).raise_for_status()
                times.append((time.perf_counter() - t0) * 1000)
            out.append(
                Measurement(
                    backend,
                    label,
                    path,
                    repeats,
                    percentile(times, 50),
                    percentile(times, 99),
                    max(times),
                )
            )
            m = out[-1]
            console.print(
                f"  {backend:10} {label:26} p50 {m.p50_ms:6.1f} ms  p99 {m.p99_ms:6.1f} ms"
            )
    return out


def print_results(results: list[Measurement], studies: int) -> None:
    table = Table(
        title=f"Worklist latency, {studies:,} studies with findings "
        f"(target p99 < {TARGET_MS:.0f} ms)",
        title_justify="left",
    )
    for col, justify in [
        ("database", "left"),
        ("request", "left"),
        ("n", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("max ms", "right"),
        ("target", "left"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in results:
        table.add_row(
            m.backend,
            m.request,
            str(m.n),
            f"{m.p50_ms:.1f}",
            f"{m.p99_ms:.1f}",
            f"{m.max_ms:.1f}",
            "[green]met[/]" if m.ok else "[red]missed[/]",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per row")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    results: list[Measurement] = []
    loads: dict[str, float] = {}
    try:
        for backend in args.backends.split(","):
            with (
                tempfile.TemporaryDirectory(prefix="bench-web-") as tmp,
                database(backend, Path(tmp)) as url,
            ):
                node = start_node(url, Path(tmp))
                try:
                    loads[backend] = bulk_insert(node, args.studies)
                    console.print(
                        f"{backend}: {args.studies:,} studies inserted in {loads[backend]:.1f} s"
                    )
                    results.extend(measure(backend, node, args.studies, args.requests))
                finally:
                    node.stop()
    except (BenchError, httpx.HTTPError) as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        return 2
    print_results(results, args.studies)
    save_json(
        args.json,
        {
            "studies": args.studies,
            "target_p99_ms": TARGET_MS,
            "insert_seconds": loads,
            "results": [{**asdict(m), "ok": m.ok} for m in results],
            "machine": machine_description(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
