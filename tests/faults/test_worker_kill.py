"""Worker processes killed (-9) in the middle of inference, in the all-in-one mode.

``tests/integration/test_pipeline.py`` kills a separately started worker on Redis.
Here ``triage-node serve`` runs its own worker on the embedded broker, and two
different deaths are shown:

* only the Celery pool process running the models dies: the Celery parent queues
  the study again at once (``workers.tasks.StudyRequest``) and gives the message
  back (``task_reject_on_worker_lost``), which a new pool process claims: well
  before the lease would have expired;
* the whole worker (parent and pool) dies: the node starts a new worker process
  itself, and the supervisor again re-queues the study after the lease.

Proves: both studies end done, each after at least two attempts, with exactly one
set of findings (one per image and model, one summary) and one set of result files.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine, create_engine

from node.db.models import StudyStatus
from tests.faults.conftest import (
    StudyRecord,
    assert_processed_once,
    assert_stored_once,
    cxr_study,
    fault_config,
    read_studies,
    send_until_acknowledged,
    sop_uid,
    wait_all_done,
    wait_study_status,
)
from tests.nodes import NodeProcess, write_config

BOTH_MODELS = """
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
IMAGES = 6
#: Long enough to tell a study queued again at once from one waiting for its lease.
LEASE = 30


def wait_worker_lost(engine: Engine, uid: str, timeout: float) -> StudyRecord:
    """Poll until the study's lost run is noticed: queued again, or claimed again."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        study = read_studies(engine)[uid]
        if study.attempts >= 2 or "worker lost" in (study.reason or ""):
            return study
        time.sleep(0.1)
    raise AssertionError(f"study {uid} still held by a dead run after {timeout} s: {study}")


def celery_parent(node: NodeProcess, timeout: float = 60) -> psutil.Process:
    """The worker process ``serve`` started (the Celery parent)."""
    assert node.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [
            p for p in psutil.Process(node.proc.pid).children() if "worker" in " ".join(p.cmdline())
        ]
        if workers:
            return workers[0]
        time.sleep(0.2)
    raise AssertionError("serve started no worker process")


@pytest.mark.slow
def test_worker_killed_mid_inference_study_finishes_once(tmp_path: Path) -> None:
    """Pool process killed, then the whole worker killed: both studies done, results once."""
    cfg = fault_config(
        tmp_path,
        rules=BOTH_MODELS,
        pipeline={"workers": 1, "lease_seconds": LEASE, "max_attempts": 5},
    )
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
    sent: dict[str, Path] = {}
    try:
        # 1. Only the pool process (the one running TensorFlow) dies.
        first_uid, first = cxr_study(tmp_path / "first", IMAGES)
        send_until_acknowledged(port, first)
        wait_study_status(engine, first_uid, {StudyStatus.PROCESSING})
        parent = celery_parent(node)
        pool = parent.children()
        assert len(pool) == 1, pool
        pool[0].send_signal(signal.SIGKILL)
        pool[0].wait(timeout=30)
        # Queued again (or claimed again) at once, long before its lease would expire (a
        # lease renewed a moment before the kill runs for two thirds of LEASE still).
        study = wait_worker_lost(engine, first_uid, timeout=LEASE / 3)
        assert study.attempts >= 2 or study.status != StudyStatus.DONE, (
            "the kill came after the study was done"
        )
        wait_all_done(engine, {first_uid})
        assert parent.is_running(), "the Celery parent should have survived its pool process"

        # 2. The whole worker dies; serve starts another one.
        second_uid, second = cxr_study(tmp_path / "second", IMAGES, offset=IMAGES)
        send_until_acknowledged(port, second)
        wait_study_status(engine, second_uid, {StudyStatus.PROCESSING})
        os.killpg(parent.pid, signal.SIGKILL)
        study = wait_study_status(engine, second_uid, set(StudyStatus))
        assert study.status == StudyStatus.PROCESSING, "the kill came after the study was done"
        done = wait_all_done(engine, {first_uid, second_uid})
        assert celery_parent(node).pid != parent.pid

        assert done[first_uid].attempts >= 2 and done[second_uid].attempts >= 2
        sent = {sop_uid(f): f for f in first + second}
        assert_stored_once(tmp_path / "var", engine, sent)
        assert_processed_once(
            engine,
            tmp_path / "var",
            done,
            {first_uid, second_uid},
            kinds={"classification", "segmentation"},
        )
        for uid in (first_uid, second_uid):
            assert done[uid].version == 1
            results = tmp_path / "var" / "results" / uid / "v1"
            # Projection images share no frame of reference: one SEG each.
            assert len(list((results / "seg").glob("*.dcm"))) == IMAGES
    finally:
        engine.dispose()
        node.stop()
