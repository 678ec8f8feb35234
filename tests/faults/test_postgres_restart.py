"""PostgreSQL (a private cluster, not the shared server) stopped and started mid-send.

Proves: while the database is down the SCP answers every C-STORE with a failure
status (0xA701, out of resources: the database could not record it), never
Success, and writes nothing; the sender re-sends after the restart and every
instance is stored once; the node (completion, supervisor) and the worker
reconnect by themselves, and the study is processed exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from node.db.models import Instance
from node.ingest import status
from tests.faults.conftest import (
    PrivatePostgres,
    WorkerProcess,
    assert_processed_once,
    assert_stored_once,
    cxr_study,
    fault_config,
    send,
    send_until_acknowledged,
    sop_uid,
    wait_all_done,
)
from tests.nodes import NodeProcess, write_config
from tests.peers import dcmsend


@pytest.mark.slow
def test_postgres_restart_mid_send_no_false_acknowledgement(
    tmp_path: Path,
    private_postgres: PrivatePostgres,
    worker_processes: Callable[[Path, Path], WorkerProcess],
) -> None:
    """Half a study stored, PostgreSQL down (failures answered), back up: all stored, done once."""
    cfg = fault_config(tmp_path, database_url=private_postgres.url, study={"quiet_seconds": 2.0})
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    uid, files = cxr_study(tmp_path / "study", 6)
    first, rest = files[:3], files[3:]
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    engine = create_engine(private_postgres.url)
    try:
        worker_processes(config, tmp_path / "worker.log")
        assert set(send(port, first).values()) == {"Success"}

        private_postgres.stop()
        # dcmsend's report carries each response's status code, not only its text.
        reports = dcmsend(port, rest)
        assert sorted(r.filename for r in reports) == sorted(rest), reports
        codes = {r.filename.name: r.code for r in reports}
        assert set(codes.values()) == {status.OUT_OF_RESOURCES_DATABASE}, codes  # 0xA701
        refused = {sop_uid(f) for f in rest}
        data_dir = tmp_path / "var"
        written = [p.name for p in (data_dir / "instances").rglob("*.dcm")]
        assert not refused & {name.removesuffix(".dcm") for name in written}, written
        assert list((data_dir / "tmp").iterdir()) == []  # nothing staged is left either
        assert list((data_dir / "quarantine").iterdir()) == []  # refused, not quarantined

        private_postgres.start()
        with engine.connect() as conn:
            in_db = conn.execute(
                select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(refused))
            ).all()
        assert in_db == [], "an instance refused while the database was down has a row"
        send_until_acknowledged(port, rest)
        assert node.proc is not None and node.proc.poll() is None
        done = wait_all_done(engine, {uid})
        assert done[uid].attempts == 1  # attempts count per routed version
        assert_stored_once(tmp_path / "var", engine, {sop_uid(f): f for f in files}, exact=True)
        assert_processed_once(engine, tmp_path / "var", done, {uid}, kinds={"classification"})
        log = (tmp_path / "node.log").read_text()
        assert log.count("database error") >= len(rest)
    finally:
        engine.dispose()
        node.stop()
