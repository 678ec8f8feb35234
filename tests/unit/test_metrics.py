"""Prometheus /metrics, /healthz and /readyz of an in-process node after real DCMTK traffic."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.runtime import Node
from tests.dicomgen import Patient, write_series
from tests.nodes import free_port, wait_for_port
from tests.peers import echoscu, storescu

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(node: Node) -> Samples:
    assert node.web_url is not None
    response = httpx.get(node.web_url + "metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_reflect_a_storescu_send(
    start_node: Callable[..., Node], database_url: str, tmp_path: Path
) -> None:
    node = start_node(database_url, web={"enabled": True})
    before = scrape(node)
    _, files = write_series(tmp_path / "ct", 3)

    assert storescu(node.dicom.port, files).returncode == 0
    assert storescu(node.dicom.port, files[:1]).returncode == 0
    assert echoscu(node.dicom.port, aet="NOT-ALLOWED").returncode != 0

    after = scrape(node)
    delta = {
        key: after.get(key, 0.0) - before.get(key, 0.0)
        for key in after
        if key[0].startswith("triage_") and key[0].endswith("_total")
    }
    assert delta[("triage_instances_received_total", (("result", "stored"),))] == 3
    assert delta[("triage_instances_received_total", (("result", "duplicate"),))] == 1
    assert value(delta, "triage_instances_received_total", result="rejected") == 0
    sent = sum(f.stat().st_size for f in files) + files[0].stat().st_size
    # Part 10 as received: the DCMTK re-encoding may differ by a few bytes from the file.
    assert abs(delta[("triage_received_bytes_total", ())] - sent) < 4 * 256
    assert delta[("triage_dicom_associations_total", (("result", "accepted"),))] == 2
    assert delta[("triage_dicom_associations_total", (("result", "rejected"),))] == 1

    # Scrape-time gauges: the study in the database (quiet time is an hour: still
    # receiving), empty queues on the embedded broker, free disk, sources readable.
    assert value(after, "triage_studies", state="receiving") == 1
    assert value(after, "triage_studies", state="done") == 0
    for queue in ("stat", "urgent", "routine"):
        assert ("triage_queue_depth", (("queue", queue),)) in after
    assert value(after, "triage_source_up", source="database") == 1
    assert value(after, "triage_source_up", source="broker") == 1
    assert value(after, "triage_disk_free_bytes") > 0
    assert node.web_url is not None
    for path in ("metrics", "healthz", "readyz"):  # no login, and nothing about the patient
        text = httpx.get(node.web_url + path, timeout=30).text
        assert Patient().name not in text and Patient().patient_id not in text

    # Released associations leave the open-associations gauge where it was.
    deadline = time.monotonic() + 60
    while value(scrape(node), "triage_dicom_associations_active") != value(
        before, "triage_dicom_associations_active"
    ):
        assert time.monotonic() < deadline, "associations still counted as open"
        time.sleep(0.2)


@pytest.fixture(params=["embedded", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The embedded SQLite broker (""), or a private redis-server on a free port."""
    if request.param == "embedded":
        yield ""
        return
    server = shutil.which("redis-server")
    assert server, "redis-server not installed"
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_queue_depth_counts_waiting_messages(
    start_node: Callable[..., Node], broker_url: str
) -> None:
    """Messages sent to queues with no worker show in those queues' depth only.

    On Redis, a message with a priority lands in a priority sub-list of the queue
    (kombu's ``queue_order_strategy = priority``); it counts all the same.
    """
    node = start_node(web={"enabled": True}, pipeline={"broker_url": broker_url})
    assert node.celery is not None
    node.celery.send_task("triage.process_study", args=[0, 0], queue="urgent")
    node.celery.send_task("triage.process_study", args=[0, 0], queue="urgent", priority=9)
    samples = scrape(node)
    assert value(samples, "triage_queue_depth", queue="urgent") == 2
    assert value(samples, "triage_queue_depth", queue="stat") == 0
    assert value(samples, "triage_queue_depth", queue="routine") == 0
    assert value(samples, "triage_source_up", source="broker") == 1


def test_health_and_readiness(start_node: Callable[..., Node]) -> None:
    node = start_node(web={"enabled": True})
    assert node.web_url is not None
    live = httpx.get(node.web_url + "healthz", timeout=30)
    assert live.status_code == 200
    body = live.json()
    assert body["role"] == "all"
    assert body["components"] == {
        "dicom": True,
        "completion": True,
        "supervisor": True,
        "exporter": True,
        "http": True,
    } | ({"retention": True} if node.retention is not None else {})
    ready = httpx.get(node.web_url + "readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["reasons"] == []

    # A dead component fails liveness; a dead listener fails readiness too.
    assert node.completion is not None and node.dicom is not None
    node.completion.stop()
    live = httpx.get(node.web_url + "healthz", timeout=30)
    assert live.status_code == 503
    assert live.json()["components"]["completion"] is False
    node.dicom.stop()
    ready = httpx.get(node.web_url + "readyz", timeout=30)
    assert ready.status_code == 503
    assert "DICOM listener is not running" in ready.json()["reasons"]


def test_readiness_reports_low_disk(start_node: Callable[..., Node]) -> None:
    node = start_node(web={"enabled": True}, storage={"min_free_bytes": 2**62})
    assert node.web_url is not None
    ready = httpx.get(node.web_url + "readyz", timeout=30)
    assert ready.status_code == 503
    assert any("storage.min_free_bytes" in reason for reason in ready.json()["reasons"])
    assert httpx.get(node.web_url + "healthz", timeout=30).status_code == 200


def test_exports_counted_by_destination_and_outcome(tmp_path: Path) -> None:
    """Deliveries to a live AE (the node itself) and to a closed port, as the exporter sees them."""
    from sqlalchemy import select

    from node.config import Settings
    from node.db.models import Instance
    from node.export import deliveries
    from tests.conftest import node_config

    dicom_port = free_port()
    cfg = node_config(tmp_path, web={"enabled": True}, dicom={"port": dicom_port})
    cfg["destinations"] = [
        {"name": "SELF", "ae_title": "TRIAGE", "host": "127.0.0.1", "port": dicom_port},
        {"name": "NOWHERE", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()},
    ]
    cfg["export"] = {"initial_backoff_seconds": 3600, "timeout_seconds": 10}
    with Node(Settings.model_validate(cfg)) as node:
        before = scrape(node)
        _, files = write_series(tmp_path / "ct", 1)
        assert storescu(dicom_port, files).returncode == 0
        with node.sessions.begin() as session:
            instance = session.execute(select(Instance)).scalar_one()
            for destination in ("SELF", "NOWHERE"):
                deliveries.enqueue(
                    session,
                    study_id=instance.study_id,
                    study_version=1,
                    destination=destination,
                    kind="original",
                    sop_instance_uid=instance.sop_instance_uid,
                    sop_class_uid=instance.sop_class_uid,
                    path=instance.path,
                )
        assert node.exporter is not None
        node.exporter.wake()

        def attempted() -> Samples | None:
            samples = scrape(node)
            counts = [
                value(samples, "triage_exports_total", destination=d, outcome=o)
                - value(before, "triage_exports_total", destination=d, outcome=o)
                for d, o in (("SELF", "delivered"), ("NOWHERE", "temporary"))
            ]
            return samples if all(counts) else None

        deadline = time.monotonic() + 120
        while (after := attempted()) is None:
            assert time.monotonic() < deadline, "exports not counted"
            time.sleep(0.2)
        # The node received its own instance again: a duplicate, answered Success.
        assert (
            value(after, "triage_instances_received_total", result="duplicate")
            - value(before, "triage_instances_received_total", result="duplicate")
            == 1
        )
        assert value(after, "triage_exports_total", destination="SELF", outcome="permanent") == 0
