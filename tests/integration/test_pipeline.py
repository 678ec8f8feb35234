"""The pipeline with real worker processes: routing, queues by urgency, models, failures.

Nodes run in-process; workers are real ``triage-node worker`` processes (Celery,
TensorFlow) on the embedded SQLite broker or on the Redis server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import func, select

from node.config import load_settings
from node.db.models import Finding, Priority, StudyStatus
from node.runtime import Node
from tests.conftest import node_config
from tests.dicomgen import Patient, cxr_from_jpeg
from tests.nodes import wait_for_study, write_config
from tests.peers import dcmsend, storescu

RULES = Path(__file__).with_name("data") / "pipeline_rules.toml"
CALLERS = ["STORESCU@127.0.0.1", "ERSCU@127.0.0.1", "ECHOSCU@127.0.0.1", "DCMSEND@127.0.0.1"]


def redis_url(db: int) -> str:
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    client.close()
    return f"redis://127.0.0.1:6379/{db}"


@pytest.fixture
def start_pipeline(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start a node with its pipeline; ``workers`` processes are spawned by the node."""
    nodes: list[Node] = []

    def _start(
        broker_url: str = "",
        workers: int = 1,
        pipeline: dict[str, Any] | None = None,
        **sections: Any,
    ) -> Node:
        cfg = node_config(
            tmp_path,
            dicom={"allowed_callers": CALLERS},
            study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
            routing={"rules_file": str(RULES)},
            pipeline={
                "broker_url": broker_url,
                "workers": workers,
                "lease_seconds": 60,
                "retry_backoff_seconds": 0.5,
                **(pipeline or {}),
            },
            **sections,
        )
        path = write_config(tmp_path / f"node{len(nodes)}.toml", cfg)
        node = Node(load_settings(path), config_path=path)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in reversed(nodes):
        node.stop()


def pneumonia_images(shared_data: Path, n: int) -> list[Path]:
    return sorted((shared_data / "cxr-pneumonia" / "val" / "PNEUMONIA").glob("*.jpeg"))[:n]


def test_chest_xray_end_to_end_matches_the_model(
    start_pipeline: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """A CXR sent with storescu reaches "done" with the probability the model gives directly.

    Also: a tibia CR matches no rule and is visible as not routed; a chest CR with
    an undecodable codestream fails with a reason while a later study still finishes.
    """
    from models.inference import load_classifier

    node = start_pipeline(web={"enabled": True})
    jpeg = pneumonia_images(shared_data, 1)[0]
    study_uid, pixels = cxr_from_jpeg(jpeg, tmp_path / "cxr.dcm")
    assert storescu(node.dicom.port, [tmp_path / "cxr.dcm"]).returncode == 0

    # Not a chest: routed nowhere, but recorded and visible.
    tibia = shared_data / "dicom" / "modalities" / "cr" / "RG3_J2KR.dcm"
    dcmsend(node.dicom.port, [tibia])  # JPEG 2000: sent in its own syntax, as a modality would
    tibia_uid = str(dcmread(tibia, stop_before_pixels=True).StudyInstanceUID)

    # Unreadable pixels: valid DICOM, but the JPEG 2000 main header (SOC, SIZ markers,
    # right after the first item's header) is zeroed, so no decoder can read it.
    broken = dcmread(shared_data / "dicom" / "modalities" / "cr" / "RG1_J2KI.dcm")
    frag = bytearray(broken.PixelData)
    frag[16:400] = bytes(384)
    broken.PixelData = bytes(frag)
    broken.StudyInstanceUID = broken.StudyInstanceUID + ".9"
    broken.SeriesInstanceUID = broken.SeriesInstanceUID + ".9"
    broken.SOPInstanceUID = broken.SOPInstanceUID + ".9"
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.save_as(tmp_path / "broken.dcm")
    dcmsend(node.dicom.port, [tmp_path / "broken.dcm"])

    done = wait_for_study(node, study_uid, {StudyStatus.DONE, StudyStatus.FAILED})
    assert done.status == StudyStatus.DONE, done.status_reason
    assert wait_for_study(node, tibia_uid, {StudyStatus.NOT_ROUTED}).routing_rule is None
    failed = wait_for_study(
        node, str(broken.StudyInstanceUID), {StudyStatus.FAILED, StudyStatus.DONE}
    )
    assert failed.status == StudyStatus.FAILED and failed.status_reason
    assert failed.attempts == 1  # unreadable pixels are not retried

    with node.sessions() as session:
        findings = (
            session.execute(select(Finding).where(Finding.study_id == done.id)).scalars().all()
        )
    per_image = [f for f in findings if f.kind == "classification" and f.sop_instance_uid]
    assert len(per_image) == 1
    direct = float(load_classifier().predict([pixels])[0, 1])
    assert per_image[0].probability == pytest.approx(direct, abs=1e-4)
    assert done.key_score == pytest.approx(direct, abs=1e-4)
    assert done.routing_rule == "chest" and done.base_priority == Priority.ROUTINE
    heatmap = np.load(node.store.path(per_image[0].heatmap_path or ""))
    assert heatmap.shape == pixels.shape and 0 <= heatmap.min() <= heatmap.max() <= 1
    lungs = [f for f in findings if f.kind == "segmentation"]
    assert len(lungs) == 1 and lungs[0].lung_area_px and lungs[0].lung_area_px > 0.05 * pixels.size
    assert lungs[0].lung_area_mm2 == pytest.approx(lungs[0].lung_area_px * 0.7 * 0.7)
    assert done.queued_at and done.started_at and done.finished_at and done.completed_at

    # The node's /metrics includes its embedded worker's task and inference metrics,
    # each family once (a duplicate family would make Prometheus reject the scrape).
    assert node.web_url is not None
    text = httpx.get(node.web_url + "metrics", timeout=30).text
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), families
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("triage_task_duration_seconds_count", (("outcome", "done"),))] >= 1
    for model in ("pneumonia-triage", "lung-seg"):
        assert samples[("triage_inference_seconds_count", (("model", model),))] >= 1

    # The workers' logs (TensorFlow, Celery, pydicom, highdicom and ours) carry no PHI.
    worker_logs = "".join(p.read_text() for p in (node.store.data_dir / "logs").glob("*.log"))
    assert "study done" in worker_logs
    patient = Patient()
    for value in (patient.name, patient.name.split("^")[0], patient.patient_id, patient.birth_date):
        assert value not in worker_logs, f"PHI value {value!r} in a worker log"


def _priority_run(node: Node, shared_data: Path, tmp_path: Path) -> None:
    images = sorted((shared_data / "cxr-pneumonia" / "val" / "NORMAL").glob("*.jpeg"))[:21]
    routine = []
    for i, jpeg in enumerate(images[:20]):
        path = tmp_path / f"routine{i}.dcm"
        routine.append(cxr_from_jpeg(jpeg, path, accession=f"R{i:03d}")[0])
        storescu(node.dicom.port, [path])
    stat_path = tmp_path / "stat.dcm"
    stat_uid, _ = cxr_from_jpeg(images[20], stat_path, accession="STAT01")
    storescu(node.dicom.port, [stat_path], aet="ERSCU")
    stat = wait_for_study(node, stat_uid, {StudyStatus.DONE})
    assert stat.base_priority == Priority.STAT and stat.routing_rule == "emergency-chest"
    finished = [wait_for_study(node, uid, {StudyStatus.DONE}) for uid in routine]
    after_stat = [
        s
        for s in finished
        if s.finished_at and stat.finished_at and s.finished_at > stat.finished_at
    ]
    assert len(after_stat) >= 12, (
        f"STAT finished after {20 - len(after_stat)} of 20 routine studies"
    )


def test_stat_overtakes_routine_embedded_broker(
    start_pipeline: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """On the embedded broker, a STAT study sent after 20 routine ones finishes before most."""
    node = start_pipeline()
    _priority_run(node, shared_data, tmp_path)


def test_stat_overtakes_routine_redis(
    start_pipeline: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """Same on Redis (separate queues consumed in priority order)."""
    node = start_pipeline(broker_url=redis_url(11))
    _priority_run(node, shared_data, tmp_path)


def test_worker_killed_mid_task_study_finishes_once(
    start_pipeline: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """kill -9 of the worker while it processes a study: the study finishes, exactly once."""
    node = start_pipeline(broker_url=redis_url(12), workers=0, pipeline={"lease_seconds": 6})
    env = {**os.environ, "TRIAGE_NODE_CONFIG": str(node.config_path)}

    def worker() -> subprocess.Popen[bytes]:
        log = (tmp_path / "worker.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "node", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    first = worker()
    study_uid = None
    paths = []
    for i, jpeg in enumerate(pneumonia_images(shared_data, 4)):
        path = tmp_path / f"img{i}.dcm"
        study_uid, _ = cxr_from_jpeg(jpeg, path, study_uid=study_uid)
        paths.append(path)
    assert study_uid is not None
    storescu(node.dicom.port, paths)
    wait_for_study(node, study_uid, {StudyStatus.PROCESSING}, timeout=120)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    second = worker()
    try:
        done = wait_for_study(node, study_uid, {StudyStatus.DONE, StudyStatus.FAILED}, timeout=120)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=60)
    assert done.status == StudyStatus.DONE, done.status_reason
    assert done.attempts == 2
    with node.sessions() as session:
        per_kind = dict(
            session.execute(
                select(Finding.kind, func.count())
                .where(Finding.study_id == done.id)
                .group_by(Finding.kind)
            ).all()
        )
    assert per_kind == {"classification": 4 + 1, "segmentation": 4}  # 4 images + study summary
