"""The broker (Redis) crashes and comes back empty while studies are queued and arriving.

The product's guarantee does not rest on the broker keeping messages: the
database is the record, and the node's supervisor re-sends a queued study
whose message is lost (not claimed ``pipeline.lease_seconds`` after sending, and
its queue in the broker empty) and retries sending while the broker is unreachable. So the private Redis here
runs without persistence (``--appendonly no --save ""``) and is killed -9:
the message it held is really gone.

Proves: ingest goes on while the broker is down (the SCP does not need it);
the study whose message died with Redis, and the study that completed while
Redis was down, are both processed after Redis returns; every study ends done,
exactly once (one attempt each, no duplicated findings or results).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine

from node.db.models import StudyStatus
from tests.faults.conftest import (
    PrivateRedis,
    WorkerProcess,
    assert_processed_once,
    assert_stored_once,
    cxr_study,
    fault_config,
    send_until_acknowledged,
    sop_uid,
    wait_all_done,
    wait_study_status,
)
from tests.nodes import NodeProcess, write_config


def queued_messages(server: PrivateRedis) -> int:
    client = redis.Redis(host="127.0.0.1", port=server.port, db=0)
    try:
        return int(client.llen("routine"))
    finally:
        client.close()


@pytest.mark.slow
def test_redis_killed_and_restarted_empty_nothing_lost(
    tmp_path: Path,
    private_redis: PrivateRedis,
    worker_processes: Callable[[Path, Path], WorkerProcess],
) -> None:
    """A message lost with Redis is re-sent; a study completed while Redis was down is sent later."""
    cfg = fault_config(tmp_path, pipeline={"broker_url": private_redis.url, "lease_seconds": 8})
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
    studies: dict[str, list[Path]] = {}
    try:
        worker = worker_processes(config, tmp_path / "worker1.log")
        uid, files = cxr_study(tmp_path / "a", 2)
        studies[uid] = files
        send_until_acknowledged(port, files)
        wait_all_done(engine, {uid})
        worker.stop()

        # B is queued, and its message sits in Redis when Redis dies.
        lost_uid, files = cxr_study(tmp_path / "b", 2, offset=2)
        studies[lost_uid] = files
        send_until_acknowledged(port, files)
        wait_study_status(engine, lost_uid, {StudyStatus.QUEUED})
        deadline = time.monotonic() + 60
        while queued_messages(private_redis) < 1:
            assert time.monotonic() < deadline, "the node never sent study B to Redis"
            time.sleep(0.1)
        private_redis.kill9()

        # C arrives and completes while there is no broker at all.
        late_uid, files = cxr_study(tmp_path / "c", 2, offset=4)
        studies[late_uid] = files
        send_until_acknowledged(port, files)
        log = tmp_path / "node.log"
        deadline = time.monotonic() + 120
        while f"cannot queue study_uid={late_uid}" not in log.read_text():
            assert time.monotonic() < deadline, "the node never tried to send study C"
            time.sleep(0.2)
        assert wait_study_status(engine, late_uid, set(StudyStatus)).status == StudyStatus.QUEUED

        private_redis.start()
        worker_processes(config, tmp_path / "worker2.log")
        done = wait_all_done(engine, set(studies))
        assert {u: s.attempts for u, s in done.items()} == {u: 1 for u in studies}
        # B's first message died with Redis; only the supervisor's re-send could deliver it.
        assert log.read_text().count(f"study queued study_uid={lost_uid}") >= 2
        sent = {sop_uid(f): f for files in studies.values() for f in files}
        assert_stored_once(tmp_path / "var", engine, sent)
        assert_processed_once(
            engine, tmp_path / "var", done, set(studies), kinds={"classification"}
        )
    finally:
        engine.dispose()
        node.stop()
