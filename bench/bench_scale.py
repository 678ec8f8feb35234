"""Scaling benchmark: studies per minute with 1, 2 and 4 worker processes, production style.

Run from the repository root::

    .venv/bin/python bench/bench_scale.py [--studies 40] [--workers 1,2,4] [--storage dicomweb]

The topology is the production one (docs/deployment.md), on loopback: PostgreSQL (a
fresh database on the local server for every worker count, dropped afterwards), a
private ``redis-server`` on a free port as the broker, the node as its own process
(``triage-node serve``, no workers of its own) and N separate ``triage-node worker``
processes, each ``--concurrency 1``, TensorFlow on the CPU. With ``--storage
dicomweb`` (the default, as in docker/docker-compose.yml) every worker has its own
data directory and fetches instances from the node by WADO-RS (``cluster.node_url``,
results uploaded back); with ``--storage shared`` the workers read the node's data
directory.

For each worker count: warm-up studies until every worker has finished one (models
loaded and traced everywhere), then ``--studies`` single-image CXR studies sent at
once over one association (DCMTK ``storescu``). Throughput = studies / (first
instance acknowledged → last study done), from the node's own database timestamps.
Reported per count: studies/min, per worker, the speed-up over the first count, and
the efficiency (speed-up / worker ratio). On a machine with fewer cores than workers
the efficiency says how the CPU is shared, not how GPUs would scale: see
docs/deployment.md, "Sizing", for the extrapolation to N GPU workers.

Exit status: 0 measured, 2 the benchmark itself failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import tomli_w
from harness import (
    LOOPBACK,
    NODELAY_ENV,
    REPO,
    SENDER_SETTINGS,
    TRIAGE_NODE,
    BenchError,
    PeerProcess,
    console,
    free_port,
    interrupt_as_exception,
    machine_description,
    port_open,
    run_checked,
    storescu_argv,
    wait_until,
    write_json,
)
from rich.table import Table
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

sys.path.insert(0, str(REPO))
from bench_pipeline import CxrStudy, cxr_images, make_studies

from node.db.models import Finding, Study
from tests.nodes import postgres_database

RESULTS = REPO / "bench" / "results" / "scale.json"
CALLED_AE = "TRIAGE"
DONE_LINE = "study done study_uid="  # workers/processing.py logs this per finished study
STUDY_TIMEOUT_S = 600.0
WORKER_ENV = {"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
#: The node's rules: chest CR to both models, no destinations (export is not measured).
RULES = """
format = 1
[[rule]]
name = "chest"
priority = "routine"
models = ["pneumonia-triage", "lung-seg"]
destinations = []
[rule.match]
Modality = ["CR", "DX"]
BodyPartExamined = "CHEST"
"""


# -- servers of this benchmark ----------------------------------------------------------
def redis_process(work: Path) -> tuple[PeerProcess, int]:
    """A private redis-server (append-only file, as in production) on a free port."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise BenchError("redis-server not found (apt-get install redis-server)")
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    process = PeerProcess(
        name="redis",
        argv=[
            redis_server,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(work),
        ],
        log_path=work / "redis.log",
        ready=lambda: port_open(port),
    )
    return process, port


class WorkerProcess(PeerProcess):
    """``triage-node worker``: Celery parent plus pool child in a process group of its own."""

    def stop(self, timeout: float = 60.0) -> None:
        proc = self._proc
        pgid = proc.pid if proc is not None and proc.poll() is None else None
        try:
            super().stop(timeout)  # SIGTERM: warm shutdown, then SIGKILL of the parent
        finally:
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)  # a pool child left behind


# -- one worker count -------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleResult:
    workers: int
    studies: int
    seconds: float  # first instance acknowledged -> last study done
    mean_processing: float  # started -> finished, under load
    #: The models' own time per study (their inference_ms: classifier incl. heatmap + U-Net);
    #: processing minus this is what a GPU does not speed up (read, DICOM objects, upload, DB).
    mean_model: float
    per_worker_done: list[int]  # studies each worker finished in the measured run

    @property
    def per_minute(self) -> float:
        return self.studies / self.seconds * 60

    def as_dict(self, reference: ScaleResult) -> dict[str, Any]:
        speedup = self.per_minute / reference.per_minute
        ratio = self.workers / reference.workers
        return asdict(self) | {
            "studies_per_min": self.per_minute,
            "studies_per_min_per_worker": self.per_minute / self.workers,
            "speedup": speedup,
            "efficiency": speedup / ratio,
        }


def _posix(value: Any) -> float:
    return float(
        value.replace(tzinfo=UTC).timestamp() if value.tzinfo is None else value.timestamp()
    )


def studies_status(engine: Engine, uids: Sequence[str]) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Study.study_instance_uid, Study.status, Study.status_reason).where(
                Study.study_instance_uid.in_(list(uids))
            )
        ).all()
    bad = [(r[0], r[1], r[2]) for r in rows if str(r[1]) in ("failed", "not_routed")]
    if bad:
        raise BenchError(f"study {bad[0][0]} {bad[0][1]}: {bad[0][2]}")
    return {str(r[0]): str(r[1]) for r in rows}


def config_for(
    data: Path,
    *,
    dicom_port: int,
    http_port: int,
    database: str,
    broker: str,
    rules: Path,
    storage: str,
    node_url: str,
    worker_http: int = 0,
) -> dict[str, Any]:
    return {
        "dicom": {"ae_title": CALLED_AE, "host": LOOPBACK, "port": dicom_port},
        "storage": {"data_dir": str(data), "min_free_bytes": 0},
        "study": {"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
        "database": {"url": database},
        "web": {"enabled": storage == "dicomweb", "host": LOOPBACK, "port": http_port},
        "routing": {"rules_file": str(rules)},
        "pipeline": {"broker_url": broker, "workers": 0, "max_backlog_studies": 0},
        "cluster": {"node_url": node_url},
        "worker": {"storage": storage, "http_host": LOOPBACK, "http_port": worker_http},
        "logging": {"level": "INFO"},
    }


def run_count(
    work: Path,
    *,
    workers: int,
    storage: str,
    warmups: Sequence[CxrStudy],
    measured: Sequence[CxrStudy],
) -> ScaleResult:
    work.mkdir(parents=True)
    rules = work / "rules.toml"
    rules.write_text(RULES)
    token = secrets.token_urlsafe(24)
    env = {**WORKER_ENV, "TRIAGE_NODE_CLUSTER__TOKEN": token}
    redis, redis_port = redis_process(work / "redis")
    with postgres_database("triage_bench") as database, redis:
        broker = f"redis://{LOOPBACK}:{redis_port}/0"
        dicom_port, http_port = free_port(), free_port()
        node_url = f"http://{LOOPBACK}:{http_port}"
        common: dict[str, Any] = {
            "database": database,
            "broker": broker,
            "rules": rules,
            "storage": storage,
            "node_url": node_url,
        }
        node_config = work / "node.toml"
        node_config.write_text(
            tomli_w.dumps(
                config_for(work / "node", dicom_port=dicom_port, http_port=http_port, **common)
            )
        )
        node = PeerProcess(
            name="triage-node serve",
            argv=[str(TRIAGE_NODE), "serve", "--config", str(node_config)],
            log_path=work / "node.log",
            env={"COLUMNS": "200", **env},
            ready=lambda: port_open(dicom_port),
            start_timeout=120,
            stop_timeout=30,
        )
        with node, contextlib.ExitStack() as stack:
            processes: list[WorkerProcess] = []
            for i in range(workers):
                data = work / "node" if storage == "shared" else work / f"worker-{i}"
                path = work / f"worker-{i}.toml"
                path.write_text(
                    tomli_w.dumps(
                        config_for(
                            data,
                            dicom_port=free_port(),
                            http_port=free_port(),
                            worker_http=free_port(),
                            **common,
                        )
                    )
                )
                worker = WorkerProcess(
                    name=f"worker {i}",
                    argv=[
                        str(TRIAGE_NODE),
                        "worker",
                        "--concurrency",
                        "1",
                        "--name",
                        f"bench{i}@%h",
                        "--config",
                        str(path),
                    ],
                    log_path=work / f"worker-{i}.log",
                    env=env,
                    stop_timeout=60,
                )
                stack.enter_context(worker)
                processes.append(worker)
            engine = create_engine(database)
            stack.callback(engine.dispose)

            def done_per_worker() -> list[int]:
                return [p.log_path.read_text(errors="replace").count(DONE_LINE) for p in processes]

            def send_and_wait(studies: Sequence[CxrStudy], timeout: float) -> None:
                run_checked(
                    storescu_argv(CALLED_AE, dicom_port, [s.path for s in studies]),
                    env=NODELAY_ENV,
                )
                uids = [s.study_instance_uid for s in studies]

                def finished() -> bool:
                    node.check_alive()
                    for p in processes:
                        p.check_alive()
                    statuses = studies_status(engine, uids)
                    return len(statuses) == len(uids) and set(statuses.values()) == {"done"}

                wait_until(finished, timeout=timeout, what=f"{len(uids)} studies to be done")

            # Warm-up: rounds of 2 per worker until each worker has done one.
            sent, per_round = 0, 2 * workers
            with console.status(f"{workers} worker(s): warming up..."):
                while not all(done_per_worker()):
                    if sent + per_round > len(warmups):
                        raise BenchError(f"warm-up ran out of studies: {done_per_worker()}")
                    send_and_wait(warmups[sent : sent + per_round], timeout=STUDY_TIMEOUT_S)
                    sent += per_round
            before = done_per_worker()
            with console.status(f"{workers} worker(s): {len(measured)} studies at once..."):
                send_and_wait(measured, timeout=STUDY_TIMEOUT_S + 30 * len(measured))
            after = done_per_worker()
            with engine.connect() as conn:
                row = conn.execute(
                    select(
                        func.min(Study.last_received_at),
                        func.max(Study.finished_at),
                    ).where(Study.study_instance_uid.in_([s.study_instance_uid for s in measured]))
                ).one()
                processing = [
                    _posix(f) - _posix(s)
                    for s, f in conn.execute(
                        select(Study.started_at, Study.finished_at).where(
                            Study.study_instance_uid.in_([s.study_instance_uid for s in measured])
                        )
                    ).all()
                ]
                measured_ids = select(Study.id).where(
                    Study.study_instance_uid.in_([s.study_instance_uid for s in measured])
                )
                # The study-level classification (no SOP instance) carries the whole call's
                # time; a single-image study has one segmentation finding (bench_pipeline).
                model_ms = conn.execute(
                    select(func.sum(Finding.inference_ms)).where(
                        Finding.study_id.in_(measured_ids),
                        (Finding.kind == "segmentation") | Finding.sop_instance_uid.is_(None),
                    )
                ).scalar_one()
    result = ScaleResult(
        workers=workers,
        studies=len(measured),
        seconds=_posix(row[1]) - _posix(row[0]),
        mean_processing=statistics.fmean(processing),
        mean_model=float(model_ms or 0.0) / 1000 / len(measured),
        per_worker_done=[a - b for a, b in zip(after, before, strict=True)],
    )
    console.print(
        f"{workers} worker(s): {result.per_minute:.1f} studies/min "
        f"({result.studies} in {result.seconds:.1f} s; per worker {result.per_worker_done})",
        highlight=False,
    )
    return result


# -- report -----------------------------------------------------------------------------
def print_results(results: Sequence[ScaleResult], storage: str) -> None:
    reference = results[0]
    table = Table(
        title=f"Throughput by worker processes (each --concurrency 1, CPU), PostgreSQL + Redis, "
        f"worker storage {storage}, {os.cpu_count()} CPU cores",
        title_justify="left",
    )
    for col in (
        "workers",
        "studies",
        "first ack → last done s",
        "studies/min",
        "per worker /min",
        f"speed-up vs {reference.workers}",
        "efficiency",
        "mean processing s",
        "of which models s",
        "done per worker",
    ):
        table.add_column(col, justify="right")
    for r in results:
        d = r.as_dict(reference)
        table.add_row(
            str(r.workers),
            str(r.studies),
            f"{r.seconds:.1f}",
            f"{r.per_minute:.1f}",
            f"{d['studies_per_min_per_worker']:.1f}",
            f"{d['speedup']:.2f}x",
            f"{d['efficiency']:.2f}",
            f"{r.mean_processing:.2f}",
            f"{r.mean_model:.2f}",
            str(r.per_worker_done),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=40, help="studies per measured run")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts")
    parser.add_argument(
        "--storage",
        choices=["shared", "dicomweb"],
        default="dicomweb",
        help="how workers read instances (worker.storage)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    try:
        counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers takes comma-separated integers, e.g. 1,2,4")
    if not counts or min(counts) < 1 or args.studies < 1:
        parser.error("--workers counts and --studies must be >= 1")
    if shutil.which("storescu") is None:
        parser.error("storescu not found (apt-get install dcmtk)")
    images = cxr_images()
    warmup_n = 2 * 2 * max(counts) * 2
    if len(images) < warmup_n + args.studies:
        parser.error(f"{warmup_n + args.studies} images needed, {len(images)} available")

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: list[ScaleResult] = []
    try:
        with interrupt_as_exception():
            with console.status("Generating the studies..."):
                warmups = make_studies(root / "studies", "scale-warmup", images[:warmup_n])
                measured = make_studies(
                    root / "studies", "scale", images[warmup_n : warmup_n + args.studies]
                )
            for n in counts:
                results.append(
                    run_count(
                        root / f"w{n}",
                        workers=n,
                        storage=args.storage,
                        warmups=warmups,
                        measured=measured,
                    )
                )
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        console.print(f"work files kept in {root}")
        return 2
    print_results(results, args.storage)
    reference = results[0]
    payload: dict[str, Any] = {
        "benchmark": "scale",
        "settings": {
            "studies": args.studies,
            "workers": counts,
            "storage": args.storage,
            "sender": SENDER_SETTINGS,
            "database": "PostgreSQL (local server, fresh database per count)",
            "broker": "private redis-server, appendonly yes",
            "tensorflow": "CPU (CUDA_VISIBLE_DEVICES empty), tf_threads = cores / concurrency",
        },
        "results": [r.as_dict(reference) for r in results],
        "machine": machine_description(),
    }
    two = next((r for r in results if r.workers == 2 * reference.workers), None)
    if two is not None:
        factor = two.per_minute / reference.per_minute
        payload["scaling_factor_1_to_2"] = factor
        console.print(f"scaling factor {reference.workers} → {two.workers} workers: {factor:.2f}x")
    write_json(args.json, payload)
    console.print(f"results: {args.json}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
