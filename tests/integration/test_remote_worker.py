"""A worker on "another host": no view of the node's disk, only its HTTP API and the database.

The node runs in-process with pipeline.workers = 0 and a cluster token; the study
arrives by storescu. A StudyProcessor with its own data_dir and
``worker.storage = "dicomweb"`` then processes it for real (TensorFlow models):
instances come by WADO-RS, results go back by upload, findings to the database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.config import ClusterSettings, Settings
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Finding, StudyStatus
from node.runtime import Node
from node.storage import InstanceStore
from node.web.images import image_png
from node.web.studies import ResultFileMissing, instance_copy, instance_file, result_file
from tests.dicomgen import Patient, cxr_from_jpeg
from tests.nodes import free_port, wait_for_study
from tests.peers import storescu
from workers.inference import ModelRunner
from workers.processing import StudyProcessor

TOKEN = "remote-worker-test-token-9876543210"


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def test_worker_without_shared_disk_processes_a_study_through_the_node_api(
    start_node: Callable[..., Node],
    database_url: str,
    shared_data: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node = start_node(
        database_url,
        web={"enabled": True, "port": free_port()},
        cluster={"token": TOKEN},
        study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
    )
    assert node.web_url is not None
    jpeg = sorted((shared_data / "cxr-pneumonia" / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    study_uid, _ = cxr_from_jpeg(jpeg, tmp_path / "cxr.dcm")
    assert storescu(node.settings.dicom.port, [tmp_path / "cxr.dcm"]).returncode == 0
    study = wait_for_study(node, study_uid, {StudyStatus.QUEUED})
    node_dir = node.store.data_dir
    before = _files(node_dir)

    worker_dir = tmp_path / "worker-host"
    settings = Settings.model_validate(
        {
            "storage": {"data_dir": str(worker_dir), "min_free_bytes": 0},
            "database": {"url": node.settings.database_url},
            "worker": {"storage": "dicomweb", "cache_max_bytes": 64 * 1024 * 1024},
            "cluster": {"token": TOKEN, "node_url": node.web_url},
        }
    )
    sessions = make_sessionmaker(make_engine(settings.database_url))
    processor = StudyProcessor(settings, sessions, ModelRunner())
    assert processor.run(study.id, study.version).state == "done"

    # Findings in the shared database, the study done.
    assert wait_for_study(node, study_uid, {StudyStatus.DONE}).key_finding is not None
    with node.sessions() as session:
        findings = session.scalars(select(Finding).where(Finding.study_id == study.id)).all()
    kinds = {f.kind for f in findings}
    assert kinds == {"classification", "segmentation"}
    arrays = [f.heatmap_path for f in findings if f.heatmap_path] + [
        f.mask_path for f in findings if f.mask_path
    ]
    assert len(arrays) == 2

    # Result files landed in the node's store, each one through the upload API.
    new = _files(node_dir) - before
    results = {p for p in new if p.parts[0] == "results"}
    assert {Path(a) for a in arrays} <= results
    assert {p.parts[3] for p in results if p.suffix == ".dcm"} == {"seg", "sr", "sc"}
    uploaded = {
        r.getMessage().split()[2]
        for r in caplog.records
        if r.name == "node.web.internal" and r.getMessage().startswith("result file ")
    }
    assert {str(p) for p in results} == uploaded
    # Nothing else of the node's directory was touched but the database and broker files.
    assert all(p.name.startswith(("triage-node.db", "broker.db")) for p in new - results), (
        new - results
    )

    # The worker's own disk: the fetched instance in its cache, no results.
    assert not (worker_dir / "results").exists()
    assert len(list((worker_dir / "worker-cache" / "instances").glob("*.dcm"))) == 1

    # A web role on a third host reads an overlay through the node's API.
    web_store = InstanceStore(tmp_path / "web-host", fsync=False)
    cluster = ClusterSettings(token=TOKEN, node_url=node.web_url)
    with result_file(web_store, cluster, arrays[0]) as path:
        assert np.load(path, allow_pickle=False).ndim == 2
    with (
        pytest.raises(ResultFileMissing),
        result_file(web_store, ClusterSettings(token="wrong", node_url=node.web_url), arrays[0]),
    ):
        pass

    # ...and renders the received image itself, retrieved by WADO-RS from the node.
    sop_uid = findings[0].sop_instance_uid
    assert sop_uid is not None
    with node.sessions() as session:
        where = instance_file(session, study_uid, sop_uid)
    assert where is not None and not where.purged
    with instance_copy(web_store, cluster, study_uid, sop_uid, where) as path:
        assert not path.is_relative_to(node_dir)
        assert dcmread(path).PixelData == dcmread(node.store.path(where.path)).PixelData
        assert image_png(path, 1).startswith(b"\x89PNG")
    with (
        pytest.raises(ResultFileMissing),
        instance_copy(
            web_store,
            ClusterSettings(token="wrong", node_url=node.web_url),
            study_uid,
            sop_uid,
            where,
        ),
    ):
        pass

    # No patient data in any log line on the way.
    patient = Patient()
    text = caplog.text
    assert patient.name not in text and patient.patient_id not in text
    assert patient.birth_date not in text
