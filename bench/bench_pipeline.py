"""Pipeline benchmark: CXR studies from acknowledgement to stored findings, on the CPU.

Run from the repository root::

    .venv/bin/python bench/bench_pipeline.py [--studies 50] [--workers 1,2] [--quiet 0.5]

The node runs as it does in production: ``triage-node serve`` as its own process
(web off), the embedded broker (``--broker redis://...`` for Redis), and
``pipeline.workers = N`` worker processes that it starts itself, TensorFlow on
the CPU (``CUDA_VISIBLE_DEVICES`` is emptied). Every study is one CR chest image
made from a pediatric CXR JPEG of the validation set (``tests.dicomgen``), sent
with DCMTK ``storescu`` (``TCP_NODELAY=1``), and routed by the packaged rules to
both models (pneumonia triage with heatmap, lung segmentation) and the result
objects (SEG, TID 1500 SR, heatmap SC). Times come from the node's own database
(read-only), except the acknowledgement: the moment ``storescu`` returned.

1. **Warm-up**, not measured: studies are sent until every worker process has
   finished at least one, so models are loaded and traced everywhere.
2. **Latency** (the first worker count only): ``--studies`` studies, one at a
   time, each sent after the previous one's findings are stored, so nothing
   queues. Per study: ack → ``finished_at`` (end-to-end), broken down into the
   quiet time (``last_received_at`` → ``completed_at``: the completion rule
   waiting ``quiet_seconds`` by design), routing and queue (→ ``started_at``:
   the worker claimed it; split at ``queued_at`` where the node set it) and
   processing (→ ``finished_at``); processing is split further by the models' own
   ``inference_ms`` in the findings. p50/p95 are reported, and end-to-end minus
   the quiet time, which is what a site's ``quiet_seconds`` setting adds to.
3. **Throughput at saturation**, for each worker count on a fresh node:
   ``--saturation`` studies over one association as fast as ``storescu`` sends
   them; rate = studies / (first study stored and acknowledged → last findings
   stored), in studies per minute, and its ratio to the first worker count.

Exit status: 0 measured, 2 the benchmark itself failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import (
    LOOPBACK,
    NODELAY_ENV,
    REPO,
    SENDER_SETTINGS,
    BenchError,
    PeerProcess,
    console,
    free_port,
    interrupt_as_exception,
    machine_description,
    node_process,
    percentile,
    run_checked,
    storescu_argv,
    wait_until,
    write_json,
)
from rich.table import Table

sys.path.insert(0, str(REPO))  # the study generator of the tests, not a copy of it

from tests.dicomgen import cxr_from_jpeg

RESULTS = REPO / "bench" / "results" / "pipeline.json"
SHIPPED_WEIGHTS = REPO / "models" / "weights"
#: What the packaged routing rules run on a chest CR (node/routing/default_rules.toml).
MODELS = ("pneumonia-triage", "lung-seg")
CXR_VAL = REPO.parent / "shared" / "data" / "cxr-pneumonia" / "val"
#: Study UIDs of the generated studies: a fixed root, one deterministic UID per label.
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
CALLED_AE = "TRIAGE"
STUDY_TIMEOUT_S = 300.0
#: Worker logs say this when a study is done (workers/processing.py).
DONE_LINE = "study done study_uid="
#: The node logs each worker process it starts (node/worker_processes.py).
WORKER_STARTED = re.compile(r"worker \d+ started pid=(\d+)")
MODEL_LOADED = re.compile(r"loaded (\S+) (\S+)")


# -- studies ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CxrStudy:
    study_instance_uid: str
    path: Path
    rows: int
    columns: int


def cxr_images() -> list[Path]:
    """Validation JPEGs, pneumonia and normal interleaved, in a fixed order."""
    pneumonia = sorted((CXR_VAL / "PNEUMONIA").glob("*.jpeg"))
    normal = sorted((CXR_VAL / "NORMAL").glob("*.jpeg"))
    mixed = [p for pair in zip(pneumonia, normal, strict=False) for p in pair]
    longer = pneumonia if len(pneumonia) > len(normal) else normal
    return mixed + longer[min(len(pneumonia), len(normal)) :]


def make_studies(directory: Path, label: str, images: Sequence[Path]) -> list[CxrStudy]:
    """One single-image CR chest study per JPEG; same label and images, same UIDs."""
    from pydicom.uid import generate_uid

    studies = []
    for i, jpeg in enumerate(images):
        uid = generate_uid(prefix=UID_ROOT, entropy_srcs=["bench-pipeline", label, str(i)])
        path = directory / label / f"{i:04d}.dcm"
        _, pixels = cxr_from_jpeg(jpeg, path, study_uid=uid, accession=f"B{i:06d}")
        studies.append(CxrStudy(uid, path, *pixels.shape))
    return studies


# -- the node's record ------------------------------------------------------------------
@dataclass(frozen=True)
class StudyTimes:
    """One study's timestamps from the node's database, as POSIX seconds."""

    status: str
    status_reason: str | None
    last_received: float
    completed: float | None
    queued: float | None
    started: float | None
    finished: float | None
    classifier_ms: float | None
    segmenter_ms: float | None


def _posix(value: str | None) -> float | None:
    """SQLite holds naive UTC (node/db/types.py): 'YYYY-MM-DD HH:MM:SS.ffffff'."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


class Catalogue:
    """The node's SQLite database, opened read-only: we look, the node writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with contextlib.closing(
            sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        ) as db:
            yield db

    def statuses(self, uids: Sequence[str]) -> dict[str, str]:
        marks = ",".join("?" * len(uids))
        with self._connect() as db:
            rows = db.execute(
                f"SELECT study_instance_uid, status FROM studies "
                f"WHERE study_instance_uid IN ({marks})",
                list(uids),
            ).fetchall()
        return {str(uid): str(status) for uid, status in rows}

    def times(self, uid: str) -> StudyTimes:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, status, status_reason, last_received_at, completed_at, queued_at, "
                "started_at, finished_at FROM studies WHERE study_instance_uid = ?",
                (uid,),
            ).fetchone()
            if row is None:
                raise BenchError(f"study {uid} is not in the node's catalogue")
            # The study-level classification (no SOP instance) carries the whole call's
            # time; a single-image study has one segmentation finding.
            models = dict(
                db.execute(
                    "SELECT kind, sum(inference_ms) FROM findings WHERE study_id = ? AND "
                    "(kind = 'segmentation' OR sop_instance_uid IS NULL) GROUP BY kind",
                    (row[0],),
                ).fetchall()
            )
        last_received = _posix(row[3])
        assert last_received is not None
        return StudyTimes(
            status=row[1],
            status_reason=row[2],
            last_received=last_received,
            completed=_posix(row[4]),
            queued=_posix(row[5]),
            started=_posix(row[6]),
            finished=_posix(row[7]),
            classifier_ms=models.get("classification"),
            segmenter_ms=models.get("segmentation"),
        )


# -- the node ---------------------------------------------------------------------------
@dataclass
class RunningNode:
    process: PeerProcess
    port: int
    data: Path
    workers: int

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.data / "triage-node.db")

    def worker_logs(self) -> list[Path]:
        return [self.data / "logs" / f"worker-{i}.log" for i in range(self.workers)]

    def logs_tail(self) -> str:
        parts = [f"--- node.log\n{self.process.tail()}"]
        for path in self.worker_logs():
            with contextlib.suppress(OSError):
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:])
                parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def send(self, studies: Sequence[CxrStudy]) -> float:
        """Send over one association; returns the wall-clock time storescu returned."""
        self.process.check_alive()
        run_checked(storescu_argv(CALLED_AE, self.port, [s.path for s in studies]), env=NODELAY_ENV)
        return time.time()

    def wait_finished(self, studies: Sequence[CxrStudy], timeout: float = STUDY_TIMEOUT_S) -> None:
        """Until every study is done; a failed or not-routed study stops the benchmark."""
        uids = [s.study_instance_uid for s in studies]

        def finished() -> bool:
            self.process.check_alive()
            statuses = self.catalogue.statuses(uids)
            bad = {u: s for u, s in statuses.items() if s in ("failed", "not_routed")}
            if bad:
                uid, status = next(iter(bad.items()))
                reason = self.catalogue.times(uid).status_reason
                raise BenchError(f"study {uid} {status}: {reason}\n{self.logs_tail()}")
            return len(statuses) == len(uids) and all(s == "done" for s in statuses.values())

        try:
            wait_until(finished, timeout=timeout, what=f"{len(uids)} studies to be done")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self.logs_tail()}") from None

    def workers_done(self) -> list[int]:
        """Studies each worker process has finished so far, from its log."""
        counts = []
        for path in self.worker_logs():
            try:
                counts.append(path.read_text(errors="replace").count(DONE_LINE))
            except OSError:
                counts.append(0)
        return counts

    def models_loaded(self) -> dict[str, str]:
        loaded: dict[str, str] = {}
        for path in self.worker_logs():
            with contextlib.suppress(OSError):
                loaded.update(MODEL_LOADED.findall(path.read_text(errors="replace")))
        return loaded


def stop_worker_processes(node_log: Path) -> None:
    """SIGKILL worker process groups that outlived the node (they run in their own sessions).

    ``serve`` stops its workers itself; this only catches what a killed node left
    behind. Only process ids the node logged as its workers, and only if they
    still run ``node worker``.
    """
    try:
        pids = [int(p) for p in WORKER_STARTED.findall(node_log.read_text(errors="replace"))]
    except OSError:
        return
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"node\0worker" in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_node(
    work: Path, *, workers: int, quiet: float, check_interval: float, broker: str
) -> Iterator[RunningNode]:
    port = free_port()
    data = work / "data"
    config: dict[str, dict[str, Any]] = {
        "dicom": {"ae_title": CALLED_AE, "host": LOOPBACK, "port": port},
        "storage": {"data_dir": str(data), "min_free_bytes": 0},
        "study": {"quiet_seconds": quiet, "check_interval_seconds": check_interval},
        "web": {"enabled": False},
        "pipeline": {"broker_url": broker, "workers": workers},
        "logging": {"level": "INFO"},
    }
    if broker.startswith("redis://"):
        import redis

        client = redis.Redis.from_url(broker)
        client.flushdb()  # a previous run's messages must not reach these workers
        client.close()
    env = {"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # serve gives its workers 30 s for a Celery warm shutdown; after that we SIGKILL
    # it and stop_worker_processes takes what is left.
    process = node_process(work, config, env=env, stop_timeout=40)
    try:
        with process:
            yield RunningNode(process, port, data, workers)
    finally:
        stop_worker_processes(process.log_path)


def warm_up(node: RunningNode, studies: Sequence[CxrStudy]) -> int:
    """Send warm-up studies until every worker has finished one; returns how many were sent."""
    per_round = max(2, 2 * node.workers)
    sent = 0
    while sent + per_round <= len(studies):
        batch = studies[sent : sent + per_round]
        node.send(batch)
        node.wait_finished(batch, timeout=600)  # the first one also loads the models
        sent += per_round
        if all(n > 0 for n in node.workers_done()):
            return sent
    raise BenchError(
        f"after {sent} warm-up studies some worker has done none: {node.workers_done()}"
    )


# -- measurements -----------------------------------------------------------------------
@dataclass(frozen=True)
class LatencySample:
    """One study, in seconds, from the node's timestamps and the sender's ack."""

    end_to_end: float  # ack -> finished
    ack_after_stored: float  # last_received -> ack (storescu's release and exit)
    quiet: float  # last_received -> completed
    routing_queue: float  # completed -> started (route, send, broker, worker claims it)
    #: The split at queued_at, None where the node left queued_at empty: it sets it
    #: after sending, guarded by status 'queued', so a worker that claims the study
    #: first (fast broker) wins and queued_at stays empty.
    routing: float | None  # completed -> queued (route, send to broker)
    delivery: float | None  # queued -> started (broker -> worker claims it)
    processing: float  # started -> finished
    classifier: float  # pneumonia model incl. heatmap (its own inference_ms)
    segmenter: float  # lung model (its own inference_ms)
    pixels: int

    @property
    def without_quiet(self) -> float:
        return self.end_to_end - self.quiet

    @property
    def processing_other(self) -> float:
        """Reading the file and pixels, heatmap/mask files, SEG/SR/SC, database."""
        return self.processing - self.classifier - self.segmenter


def sample(study: CxrStudy, ack: float, t: StudyTimes) -> LatencySample:
    if t.completed is None or t.started is None or t.finished is None:
        raise BenchError(f"study {study.study_instance_uid} is missing timestamps: {t}")
    return LatencySample(
        end_to_end=t.finished - ack,
        ack_after_stored=ack - t.last_received,
        quiet=t.completed - t.last_received,
        routing_queue=t.started - t.completed,
        routing=None if t.queued is None else t.queued - t.completed,
        delivery=None if t.queued is None else t.started - t.queued,
        processing=t.finished - t.started,
        classifier=(t.classifier_ms or 0.0) / 1000,
        segmenter=(t.segmenter_ms or 0.0) / 1000,
        pixels=study.rows * study.columns,
    )


def measure_latency(node: RunningNode, studies: Sequence[CxrStudy]) -> list[LatencySample]:
    samples: list[LatencySample] = []
    with console.status(f"{node.workers} worker(s): latency...") as status:
        for i, study in enumerate(studies, 1):
            ack = node.send([study])
            node.wait_finished([study])
            samples.append(sample(study, ack, node.catalogue.times(study.study_instance_uid)))
            status.update(
                f"{node.workers} worker(s): latency {i}/{len(studies)}, last end-to-end "
                f"{samples[-1].end_to_end:.2f} s"
            )
    return samples


@dataclass(frozen=True)
class Saturation:
    workers: int
    studies: int
    send_seconds: float  # storescu, all studies over one association
    seconds: float  # first study stored (= acknowledged) -> last findings stored
    mean_processing: float  # started -> finished, under load

    @property
    def per_minute(self) -> float:
        return self.studies / self.seconds * 60


def measure_saturation(node: RunningNode, studies: Sequence[CxrStudy]) -> Saturation:
    """All studies at once; the node acknowledges an instance right after recording it,
    so the first ``last_received_at`` is the first acknowledgement, on the node's clock."""
    started = time.time()
    sent = node.send(studies)
    node.wait_finished(studies, timeout=STUDY_TIMEOUT_S + 60 * len(studies))
    times = [node.catalogue.times(s.study_instance_uid) for s in studies]
    first_ack = min(t.last_received for t in times)
    last_done = max(t.finished or 0.0 for t in times)
    return Saturation(
        workers=node.workers,
        studies=len(studies),
        send_seconds=sent - started,
        seconds=last_done - first_ack,
        mean_processing=statistics.fmean((t.finished or 0.0) - (t.started or 0.0) for t in times),
    )


def run_config(
    work: Path,
    args: argparse.Namespace,
    *,
    workers: int,
    warmups: Sequence[CxrStudy],
    latency_studies: Sequence[CxrStudy],
    saturation_studies: Sequence[CxrStudy],
) -> tuple[list[LatencySample], Saturation, dict[str, str]]:
    """One fresh node with ``workers`` worker processes: warm up, latency (if asked), saturation."""
    work.mkdir(parents=True)
    with console.status(f"{workers} worker(s): starting the node..."):
        node_cm = running_node(
            work,
            workers=workers,
            quiet=args.quiet,
            check_interval=args.check_interval,
            broker=args.broker,
        )
    with node_cm as node:
        with console.status(f"{workers} worker(s): warming up..."):
            warmed = warm_up(node, warmups)
        models = node.models_loaded()
        console.print(
            f"{workers} worker(s): warm after {warmed} studies "
            f"(done per worker: {node.workers_done()}); models: {models}",
            highlight=False,
        )
        latency = measure_latency(node, latency_studies) if latency_studies else []
        if latency:
            p50 = percentile([s.end_to_end for s in latency], 50)
            console.print(f"  latency: p50 end-to-end {p50:.2f} s", highlight=False)
        with console.status(f"{workers} worker(s): {len(saturation_studies)} studies at once..."):
            result = measure_saturation(node, saturation_studies)
        console.print(
            f"  saturation: {result.per_minute:.1f} studies/min "
            f"({result.studies} studies in {result.seconds:.1f} s)",
            highlight=False,
        )
    return latency, result, models


# -- report -----------------------------------------------------------------------------
STAGES: list[tuple[str, str]] = [
    ("end_to_end", "end-to-end: ack → findings stored"),
    ("without_quiet", "end-to-end minus quiet time"),
    ("quiet", "  quiet time: last received → complete"),
    ("routing_queue", "  routing + queue: complete → started"),
    ("routing", "    routing + dispatch: complete → queued"),
    ("delivery", "    broker delivery: queued → started"),
    ("processing", "  processing: started → findings stored"),
    ("classifier", "    pneumonia model + heatmap"),
    ("segmenter", "    lung segmentation"),
    ("processing_other", "    other: read, SEG/SR/SC, files, DB"),
    ("ack_after_stored", "  (stored → storescu returned, not in e2e)"),
]


def stage_stats(samples: Sequence[LatencySample]) -> dict[str, dict[str, float]]:
    """p50/p95/mean/max per stage, over the samples that have it (``n``); empty if none do."""
    out: dict[str, dict[str, float]] = {}
    for key, _ in STAGES:
        values = [float(v) for s in samples if (v := getattr(s, key)) is not None]
        out[key] = {"n": len(values)}
        if values:
            out[key] |= {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "mean": statistics.fmean(values),
                "max": max(values),
            }
    return out


def print_latency(stats: dict[str, dict[str, float]], n: int, workers: int, quiet: float) -> None:
    table = Table(
        title=f"Latency of {n} single-image CXR studies sent one at a time, "
        f"{workers} worker process(es), CPU, quiet_seconds={quiet:g}",
        title_justify="left",
    )
    table.add_column("stage", style="bold")
    for col in ("p50 s", "p95 s", "mean s", "max s", "n"):
        table.add_column(col, justify="right")
    for key, label in STAGES:
        s = stats[key]
        cells = [f"{s[c]:.3f}" if c in s else "-" for c in ("p50", "p95", "mean", "max")]
        table.add_row(label, *cells, str(int(s["n"])))
    console.print(table)


def print_saturation(results: Sequence[Saturation]) -> None:
    reference = results[0]
    table = Table(
        title="Throughput at saturation (all studies sent at once over one association)",
        title_justify="left",
    )
    table.add_column("worker processes", justify="right", style="bold")
    table.add_column("studies", justify="right")
    table.add_column("send s", justify="right")
    table.add_column("first ack → last done s", justify="right")
    table.add_column("studies/min", justify="right")
    table.add_column("mean processing s", justify="right")
    table.add_column(f"vs {reference.workers} worker(s)", justify="right")
    for r in results:
        table.add_row(
            str(r.workers),
            str(r.studies),
            f"{r.send_seconds:.2f}",
            f"{r.seconds:.2f}",
            f"{r.per_minute:.1f}",
            f"{r.mean_processing:.2f}",
            f"{r.per_minute / reference.per_minute:.2f}x",
        )
    console.print(table)


# -- main -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=50, help="studies for the latency run")
    parser.add_argument(
        "--workers", default="1,2", help="worker process counts; latency uses the first"
    )
    parser.add_argument("--quiet", type=float, default=0.5, help="[study] quiet_seconds")
    parser.add_argument(
        "--check-interval", type=float, default=0.1, help="[study] check_interval_seconds"
    )
    parser.add_argument("--saturation", type=int, default=40, help="studies per throughput run")
    parser.add_argument(
        "--broker", default="", help="empty: embedded broker; e.g. redis://127.0.0.1:6379/13"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers takes comma-separated integers, e.g. 1,2")
    if not worker_counts or min(worker_counts) < 1:
        parser.error("--workers needs at least one count, each >= 1")
    if args.studies < 1 or args.saturation < 1:
        parser.error("--studies and --saturation must be >= 1")
    if shutil.which("storescu") is None:
        parser.error("storescu not found (apt-get install dcmtk)")
    images = cxr_images()
    warmup_n = 2 * max(2, 2 * max(worker_counts))
    needed = warmup_n + args.studies + args.saturation
    if len(images) < needed:
        parser.error(f"{needed} images needed, {CXR_VAL} has {len(images)}")
    weights = os.environ.get("TRIAGE_NODE_MODELS__WEIGHTS_DIR")
    weights_dir = Path(weights) if weights else SHIPPED_WEIGHTS
    missing = [m for m in MODELS if not (weights_dir / f"{m}.json").is_file()]
    if missing:
        parser.error(
            f"no {', '.join(missing)} in {weights_dir} "
            "(set TRIAGE_NODE_MODELS__WEIGHTS_DIR to a folder with the weights)"
        )
    if weights:
        console.print(f"[yellow]weights from TRIAGE_NODE_MODELS__WEIGHTS_DIR={weights}[/yellow]")

    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    latency: list[LatencySample] = []
    saturation: list[Saturation] = []
    models: dict[str, str] = {}
    try:
        with interrupt_as_exception():
            with console.status("Generating the studies..."):
                # Disjoint images: warm-up, latency, saturation; each set is one study UID
                # set, so one node can take all three.
                warmups = make_studies(root / "studies", "warmup", images[:warmup_n])
                lat = make_studies(
                    root / "studies", "latency", images[warmup_n : warmup_n + args.studies]
                )
                sat = make_studies(
                    root / "studies",
                    "saturation",
                    images[warmup_n + args.studies :][: args.saturation],
                )
            sizes = Counter(f"{s.rows}x{s.columns}" for s in lat + sat)
            console.print(
                f"{len(lat)} + {len(sat)} single-image CR chest studies, 8 bit, "
                f"{', '.join(f'{n} of {size}' for size, n in sizes.most_common(3))}; "
                f"sender: {SENDER_SETTINGS}; broker: {args.broker or 'embedded (SQLite)'}",
                highlight=False,
            )
            for n, workers in enumerate(worker_counts):
                lat_samples, result, loaded = run_config(
                    root / f"workers-{workers}",
                    args,
                    workers=workers,
                    warmups=warmups,
                    latency_studies=lat if n == 0 else [],
                    saturation_studies=sat,
                )
                latency = latency or lat_samples
                models = models or loaded
                saturation.append(result)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the node and its workers were stopped[/yellow]")
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stats = stage_stats(latency)
    print_latency(stats, len(latency), worker_counts[0], args.quiet)
    print_saturation(saturation)
    ref = saturation[0]
    for r in saturation[1:]:
        console.print(
            f"{r.workers} vs {ref.workers} worker process(es): "
            f"{r.per_minute / ref.per_minute:.2f}x the studies/min on "
            f"{os.cpu_count()} CPU cores",
            highlight=False,
        )
    write_json(
        args.json,
        {
            "benchmark": "pipeline",
            "device": "CPU (CUDA_VISIBLE_DEVICES empty)",
            "weights_dir": weights or "shipped (models/weights)",
            "models": models,
            "quiet_seconds": args.quiet,
            "check_interval_seconds": args.check_interval,
            "broker": args.broker or "embedded (SQLite)",
            "sender": SENDER_SETTINGS,
            "studies": {
                "kind": "single-image CR chest, 8 bit, from cxr-pneumonia/val JPEGs",
                "sizes": dict(sizes),
            },
            "latency": {
                "workers": worker_counts[0],
                "studies": len(latency),
                "definition": "ack = storescu returned; end-to-end = ack -> studies.finished_at",
                "seconds": stats,
                "samples": [asdict(s) for s in latency],
            },
            "saturation": [{**asdict(r), "studies_per_minute": r.per_minute} for r in saturation],
            "scaling": {
                f"{r.workers}/{ref.workers}": r.per_minute / ref.per_minute for r in saturation[1:]
            },
            "machine": machine_description(),
        },
    )
    console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
