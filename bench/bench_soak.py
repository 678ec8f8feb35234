"""Soak: studies pushed at a fixed rate from two senders for minutes while the web API is polled.

``.venv/bin/python bench/bench_soak.py [--minutes 10] [--interval 10]``

One ``triage-node serve`` in its embedded configuration (SQLite, embedded broker, no
server) with one worker process running the shipped models. Two sender threads each
send one single-image CR chest study (224x224, from the validation JPEGs) with storescu
every ``--interval`` seconds; a poller logs in as a user created for the run and reads
``/api/worklist`` every second. Reported: RSS of the node and of its worker processes
at the start (after a warm-up study) and at the end, send failures and HTTP errors,
p50/p99 ingest latency (storescu wall time per single-instance study, association
included), studies done. A Rich table, and JSON in ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil
from harness import (
    LOOPBACK,
    NODELAY_ENV,
    REPO,
    TRIAGE_NODE,
    BenchError,
    PeerProcess,
    console,
    free_port,
    interrupt_as_exception,
    machine_description,
    node_process,
    percentile,
    storescu_argv,
    wait_until,
    write_json,
)
from rich.table import Table

sys.path.insert(0, str(REPO))  # the study generator of the tests, not a copy of it

from tests.dicomgen import cxr_from_jpeg

RESULTS = REPO / "bench" / "results" / "soak.json"
CXR_VAL = REPO.parent / "shared" / "data" / "cxr-pneumonia" / "val"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
CALLED_AE = "TRIAGE"
USER, PASSWORD = "soak", "soak-bench-password"  # pragma: allowlist secret
JPEGS = sorted(CXR_VAL.glob("*/*.jpeg"))


@dataclass
class Counters:
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    send_failures: int = 0
    polls: int = 0
    http_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def workers_of(node_pid: int) -> list[int]:
    """Worker processes of the node: ``node worker`` processes among its descendants."""
    out = []
    for child in psutil.Process(node_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "worker" in cmd and "node" in cmd:
            out.append(child.pid)
    return out


def worker_rss_mb(node_pid: int) -> float:
    """Whole worker trees (Celery parent and its pool child), summed."""
    total = 0.0
    for pid in workers_of(node_pid):
        proc = psutil.Process(pid)
        total += proc.memory_info().rss / 2**20
        total += sum(c.memory_info().rss / 2**20 for c in proc.children(recursive=True))
    return total


def send_one(name: str, n: int, port: int, studies: Path, c: Counters) -> None:
    """Generate study ``n`` of sender ``name`` and send it; count its time or its failure."""
    from pydicom.uid import generate_uid

    uid = generate_uid(prefix=UID_ROOT, entropy_srcs=["soak", name, str(n)])
    path = studies / name / f"{n:05d}.dcm"
    cxr_from_jpeg(JPEGS[n % len(JPEGS)], path, study_uid=uid, accession=f"S{n:06d}")
    started = time.monotonic()
    run = subprocess.run(
        storescu_argv(CALLED_AE, port, [path]),
        env={**os.environ, **NODELAY_ENV},
        capture_output=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    with c.lock:
        c.sent += 1
        if run.returncode == 0:
            c.latencies.append(took)
        else:
            c.send_failures += 1
    path.unlink(missing_ok=True)


def sender(
    name: str, port: int, studies: Path, interval: float, stop: threading.Event, c: Counters
) -> None:
    """One study every ``interval`` seconds on a fixed schedule (a slow send does not shift it)."""
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        send_one(name, n, port, studies, c)
        n += 1
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


def poller(web: str, stop: threading.Event, c: Counters) -> None:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    body = json.dumps({"name": USER, "password": PASSWORD}).encode()
    login = urllib.request.Request(
        f"{web}/api/session", data=body, headers={"Content-Type": "application/json"}
    )
    opener.open(login, timeout=30).close()
    while not stop.wait(1.0):
        try:
            with opener.open(f"{web}/api/worklist", timeout=30) as r:
                r.read()
                ok = r.status == 200
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            ok = False
        with c.lock:
            c.polls += 1
            c.http_errors += not ok


def statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return dict(conn.execute("select status, count(*) from studies group by status").fetchall())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the senders push")
    parser.add_argument(
        "--interval", type=float, default=10.0, help="seconds between a sender's studies"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)

    with TemporaryDirectory(prefix="soak-") as tmp, interrupt_as_exception():
        work = Path(tmp)
        port, web_port = free_port(), free_port()
        data = work / "data"
        config: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": CALLED_AE, "host": LOOPBACK, "port": port},
            "storage": {"data_dir": str(data), "min_free_bytes": 0},
            "study": {"quiet_seconds": 1.0, "check_interval_seconds": 0.2},
            "web": {"enabled": True, "host": LOOPBACK, "port": web_port},
            "pipeline": {"workers": 1},
            "logging": {"level": "WARNING"},
        }
        env = {"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        node: PeerProcess = node_process(work, config, env=env, stop_timeout=40)
        with node:
            config_path = work / "node.toml"
            subprocess.run(
                [str(TRIAGE_NODE), "users", "add", USER, "--role", "radiologist",
                 "--password-stdin", "--config", str(config_path)],
                input=PASSWORD + "\n", text=True, check=True, capture_output=True,
            )  # fmt: skip
            pid = node.pid
            if pid is None:
                raise BenchError("node has no process")
            db = data / "triage-node.db"
            # Warm-up: one study through the models, so the start RSS includes them.
            warm = Counters()
            send_one("warm", 0, port, work / "studies", warm)
            if warm.send_failures:
                raise BenchError("warm-up send failed")
            wait_until(
                lambda: statuses(db).get("done", 0) >= 1, timeout=300, what="warm-up study done"
            )
            start = {"node_mb": rss_mb(pid), "workers_mb": worker_rss_mb(pid)}
            console.print(
                f"warm: node {start['node_mb']:.0f} MB, workers {start['workers_mb']:.0f} MB"
            )

            c = Counters()
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=sender,
                    args=(name, port, work / "studies", args.interval, stop, c),
                    daemon=True,
                )
                for name in ("a", "b")
            ]
            threads.append(
                threading.Thread(
                    target=poller, args=(f"http://{LOOPBACK}:{web_port}", stop, c), daemon=True
                )
            )
            t0 = time.monotonic()
            for t in threads:
                t.start()
            stop.wait(args.minutes * 60)
            stop.set()
            for t in threads:
                t.join(timeout=180)
            pushed_s = time.monotonic() - t0
            # Let the queue drain (bounded), then measure.
            expected = c.sent - c.send_failures + 1
            try:
                wait_until(
                    lambda: (
                        sum(statuses(db).get(s, 0) for s in ("done", "failed", "not_routed"))
                        >= expected
                    ),
                    timeout=300,
                    what="studies to finish",
                )
            except BenchError as exc:
                console.print(f"[yellow]{exc}[/yellow]")
            end = {"node_mb": rss_mb(pid), "workers_mb": worker_rss_mb(pid)}
            final = statuses(db)
            node.check_alive()

    ok = sorted(c.latencies)
    result = {
        "minutes": args.minutes,
        "interval_s": args.interval,
        "pushed_s": round(pushed_s, 1),
        "configuration": "embedded (SQLite, embedded broker), 1 worker process",
        "studies_sent": c.sent,
        "send_failures": c.send_failures,
        "polls": c.polls,
        "http_errors": c.http_errors,
        "ingest_p50_ms": round(percentile(ok, 50) * 1000, 1) if ok else None,
        "ingest_p99_ms": round(percentile(ok, 99) * 1000, 1) if ok else None,
        "studies_by_status": final,
        "rss_start_mb": {k: round(v, 1) for k, v in start.items()},
        "rss_end_mb": {k: round(v, 1) for k, v in end.items()},
        "machine": machine_description(),
    }
    table = Table(title=f"soak: {args.minutes:g} min, 2 senders x 1 study/{args.interval:g}s, "
                  "API polled 1/s (embedded SQLite, 1 worker)", title_justify="left")  # fmt: skip
    table.add_column("measure", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("studies sent", str(c.sent)),
        ("send failures", str(c.send_failures)),
        ("API polls / HTTP errors", f"{c.polls} / {c.http_errors}"),
        ("ingest p50 (storescu, 1 image)", f"{result['ingest_p50_ms']} ms"),
        ("ingest p99", f"{result['ingest_p99_ms']} ms"),
        ("studies done (incl. warm-up)", str(final.get("done", 0))),
        ("studies failed / other", f"{final.get('failed', 0)} / "
         f"{sum(v for k, v in final.items() if k not in ('done', 'failed'))}"),
        ("node RSS start -> end", f"{start['node_mb']:.0f} -> {end['node_mb']:.0f} MB"),
        ("workers RSS start -> end", f"{start['workers_mb']:.0f} -> {end['workers_mb']:.0f} MB"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    write_json(args.json, result)
    console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
