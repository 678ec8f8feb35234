"""Prometheus metrics of the node, the web role and the workers (every name starts ``triage_``).

Counters and histograms are process-wide objects, like the Celery app: the SCP, the
exporter and the worker tasks update them in place. What lives in the database or
in the broker (studies by state, queue depth) and free disk are read at scrape time
by :class:`NodeCollector`, so each role reports the shared truth rather than its
own view. A worker's prefork children write to prometheus_client's multiprocess
files (``PROMETHEUS_MULTIPROC_DIR``, set by ``triage-node worker`` before the pool
forks) and the worker's HTTP thread sums them (:func:`worker_registry`).

Labels never carry patient data: results, destination, model and queue names only.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Study, StudyStatus
from node.observability.health import pid_alive

log = logging.getLogger(__name__)

#: ``Content-Type`` of :func:`exposition`'s output (Prometheus text format 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_LATEST

# -- DICOM ingest (node process, SCP threads) ----------------------------------------
ASSOCIATIONS = Counter(
    "triage_dicom_associations",
    "DICOM associations requested of the SCP, by result (accepted, rejected).",
    ["result"],
)
ACTIVE_ASSOCIATIONS = Gauge(
    "triage_dicom_associations_active",
    "DICOM associations open now.",
    multiprocess_mode="livesum",
)
INSTANCES = Counter(
    "triage_instances_received",
    "C-STORE requests answered, by result (stored, duplicate, rejected).",
    ["result"],
)
RECEIVED_BYTES = Counter(
    "triage_received_bytes", "Bytes of datasets received by C-STORE (any result)."
)

# -- results out (node process, exporter thread) --------------------------------------
EXPORTS = Counter(
    "triage_exports",
    "Delivery attempts to destinations, by destination and outcome "
    "(delivered, temporary, permanent).",
    ["destination", "outcome"],
)

# -- workers (prefork children; multiprocess mode) -------------------------------------
TASK_SECONDS = Histogram(
    "triage_task_duration_seconds",
    "Wall time of one study-processing task, by outcome (done, failed, retry, skipped, error).",
    ["outcome"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
INFERENCE_SECONDS = Histogram(
    "triage_inference_seconds",
    "Time of one model call on a study's images (the classifier includes Grad-CAM), by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)

# Known label values start at 0, so a scrape shows them before the first event.
for _result in ("accepted", "rejected"):
    ASSOCIATIONS.labels(_result)
for _result in ("stored", "duplicate", "rejected"):
    INSTANCES.labels(_result)

#: The queues a node reports the depth of, most urgent first (workers.celery_app.QUEUE_ORDER).
QUEUES = ("stat", "urgent", "routine")


class _Accepted:
    """Associations counted as open, so a release or abort is only counted once."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, assoc: object) -> None:
        with self._lock:
            self._ids.add(id(assoc))
        ACTIVE_ASSOCIATIONS.inc()

    def discard(self, assoc: object) -> None:
        with self._lock:
            if id(assoc) not in self._ids:
                return
            self._ids.discard(id(assoc))
        ACTIVE_ASSOCIATIONS.dec()


_open = _Accepted()


def association_handlers() -> list[tuple[Any, Callable[[Any], None]]]:
    """pynetdicom notification handlers counting associations; bind them after the SCP's.

    A caller refused in the SCP's own EVT_REQUESTED handler (caller policy, per-caller
    limit) is rejected before negotiation, where pynetdicom fires no EVT_REJECTED:
    the EVT_REQUESTED handler here runs after it and sees ``is_rejected``. Rejections
    by pynetdicom itself (association limit) come as EVT_REJECTED.
    """
    from pynetdicom import evt

    return [
        (evt.EVT_REQUESTED, _on_requested),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_closed),
        (evt.EVT_ABORTED, _on_closed),
    ]


def _on_accepted(event: Any) -> None:
    ASSOCIATIONS.labels("accepted").inc()
    _open.add(event.assoc)


def _on_requested(event: Any) -> None:
    if event.assoc.is_rejected:
        ASSOCIATIONS.labels("rejected").inc()


def _on_rejected(event: Any) -> None:
    ASSOCIATIONS.labels("rejected").inc()


def _on_closed(event: Any) -> None:
    _open.discard(event.assoc)


def queue_depths(celery: Any, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """Messages waiting in each queue, asked of the broker.

    A passive ``queue_declare`` answers the message count on every kombu transport
    we use: Redis sums the priority sub-lists (``queue``, ``queue\\x06\\x163``, ...),
    the embedded SQLAlchemy transport counts visible rows, AMQP reports ready
    messages. A queue nobody declared yet holds nothing.
    """
    depths: dict[str, int] = {}
    with celery.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        for name in queues:
            channel = conn.channel()
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                depths[name] = 0
            finally:
                channel.close()
    return depths


def studies_by_state(sessions: sessionmaker[Session]) -> dict[str, int]:
    counts = {str(state): 0 for state in StudyStatus}
    with sessions() as session:
        for state, n in session.execute(
            select(Study.status, func.count()).group_by(Study.status)
        ).all():
            counts[str(state)] = int(n)
    return counts


class NodeCollector(Collector):
    """Scrape-time gauges: studies by state (database), queue depth (broker), free disk.

    A source that cannot be read is reported as ``triage_source_up{source=...} 0``
    (and its gauges left out) rather than failing the whole scrape.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        free_bytes: Callable[[], int],
        celery: Any | None = None,
    ) -> None:
        self.sessions = sessions
        self.free_bytes = free_bytes
        self.celery = celery

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "triage_source_up",
            "Whether a scrape-time source (database, broker) could be read.",
            labels=["source"],
        )
        try:
            counts = studies_by_state(self.sessions)
        except Exception as exc:
            log.warning("metrics: cannot count studies error=%s", type(exc).__name__)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            studies = GaugeMetricFamily(
                "triage_studies", "Studies (current versions) by state.", labels=["state"]
            )
            for state, n in counts.items():
                studies.add_metric([state], n)
            yield studies
        if self.celery is not None:
            try:
                depths = queue_depths(self.celery)
            except Exception as exc:
                log.warning("metrics: cannot read queue depth error=%s", type(exc).__name__)
                up.add_metric(["broker"], 0)
            else:
                up.add_metric(["broker"], 1)
                depth = GaugeMetricFamily(
                    "triage_queue_depth", "Messages waiting in each queue.", labels=["queue"]
                )
                for name, n in depths.items():
                    depth.add_metric([name], n)
                yield depth
        yield up
        yield GaugeMetricFamily(
            "triage_disk_free_bytes",
            "Free bytes on the file system of storage.data_dir.",
            value=self.free_bytes(),
        )


#: Families only worker processes fill in (the node reports its embedded workers' values).
WORKER_FAMILIES = frozenset({"triage_task_duration_seconds", "triage_inference_seconds"})


class _ProcessMetrics(Collector):
    """This process's own counters and histograms (the default registry), minus ``exclude``."""

    def __init__(self, exclude: frozenset[str] = frozenset()) -> None:
        self.exclude = exclude

    def collect(self) -> Iterable[Metric]:
        return (m for m in REGISTRY.collect() if m.name not in self.exclude)


class EmbeddedWorkerMetrics(Collector):
    """Task and inference metrics of the worker processes a node started itself.

    Each ``triage-node worker`` writes prometheus_client multiprocess files under
    ``<data_dir>/worker-metrics/<host>-<pid>/`` (its pool children too). The node
    sums the files of its live workers, so the all-in-one ``/metrics`` shows task
    durations and inference latency without a port per embedded worker.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        host = socket.gethostname()
        files: list[str] = []
        for folder in self.root.glob(f"{host}-*"):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and pid_alive(int(pid)):
                files += [str(f) for f in folder.glob("*.db")]
        try:
            merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        except (OSError, ValueError) as exc:  # a worker exiting while we read its files
            log.warning("metrics: cannot read worker metrics error=%s", type(exc).__name__)
            return []
        return [m for m in merged if m.name in WORKER_FAMILIES]


def node_registry(
    collector: NodeCollector, *, embedded_workers: Path | None = None
) -> CollectorRegistry:
    """What a node or web process exposes: its own metrics plus the scrape-time gauges.

    ``embedded_workers``: the ``worker-metrics`` folder of workers this node started,
    whose task and inference metrics it reports as its own.
    """
    registry = CollectorRegistry(auto_describe=False)
    if embedded_workers is None:
        registry.register(_ProcessMetrics())
    else:
        registry.register(_ProcessMetrics(exclude=WORKER_FAMILIES))
        registry.register(EmbeddedWorkerMetrics(embedded_workers))
    registry.register(collector)
    return registry


def worker_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """The sum over a worker's processes (multiprocess mode), plus ``extra`` collectors."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
