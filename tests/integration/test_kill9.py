"""Nothing acknowledged is lost when the node is killed (-9) in the middle of a send."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import create_engine, func, select

from node.db.models import Instance, Study
from tests.conftest import node_config
from tests.dicomgen import write_series
from tests.nodes import NodeProcess, write_config
from tests.peers import dcmtk_env, require, storescu, storescu_responses


def test_kill9_mid_send_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    """storescu sends 200 instances; the node is killed -9 midway and restarted.

    Every instance storescu saw acknowledged is on disk, whole, and in the
    database; re-sending everything then completes the study with exactly 200.
    """
    _, files = write_series(tmp_path / "in", 200, size=128)
    cfg = node_config(tmp_path)
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    out_path = tmp_path / "storescu.out"
    try:
        with out_path.open("w") as out:
            sender = subprocess.Popen(
                [
                    require("storescu"),
                    "-v",
                    "-nh",
                    "-aec",
                    "TRIAGE",
                    "127.0.0.1",
                    str(port),
                    *map(str, files),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if out_path.read_text().count("Received Store Response (Success)") >= 60:
                    break
                time.sleep(0.01)
            node.kill9()
            sender.wait(timeout=60)
    finally:
        node.stop()
    acknowledged = [f for f, s in storescu_responses(out_path.read_text()) if s == "Success"]
    assert 60 <= len(acknowledged) < 200, f"kill landed badly: {len(acknowledged)} acknowledged"

    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
        with engine.connect() as conn:
            rows = dict(conn.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        for f in acknowledged:
            uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert uid in rows, f"acknowledged {f.name} missing from the database"
            stored = dcmread(tmp_path / "var" / rows[uid])
            assert stored.SOPInstanceUID == uid and len(stored.PixelData) == 128 * 128 * 2
        assert list((tmp_path / "var" / "tmp").glob("*.part")) == []

        result = storescu(port, files)
        assert [s for _, s in storescu_responses(result.stdout + result.stderr)] == [
            "Success"
        ] * 200
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Instance)) == 200
            assert conn.scalar(select(Study.instance_count)) == 200
        engine.dispose()
    finally:
        node.stop()
