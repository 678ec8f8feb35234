"""The node killed (-9) ten times at random points while modalities send several studies.

Proves: every instance a sender saw acknowledged is on disk (whole) and in the
database exactly once, with no stray or temporary files; every study ends done,
and each study version is processed exactly once (no duplicated findings, one
SR and one heatmap per image for the final version), however the kills fell
between receiving, completing, routing and queueing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from tests.faults.conftest import (
    WorkerProcess,
    assert_processed_once,
    assert_stored_once,
    cxr_study,
    fault_config,
    send,
    sop_uid,
    wait_all_done,
)
from tests.nodes import NodeProcess, write_config

SEED = 20261125
KILLS = 10
STUDIES = 3
IMAGES = 8


class Modality(threading.Thread):
    """Sends one study in small associations, re-sending whatever was not acknowledged."""

    def __init__(self, port: int, files: list[Path], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.files = files
        self.rng = rng
        self.acknowledged: set[Path] = set()
        self.refused: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 300
            pending = list(self.files)
            while pending and time.monotonic() < deadline:
                batch = pending[: self.rng.randint(1, 3)]
                answers = send(self.port, batch)
                for f, answer in answers.items():
                    if answer == "Success":
                        self.acknowledged.add(f)
                    else:
                        self.refused.append(answer)
                pending = [f for f in pending if f not in self.acknowledged]
                time.sleep(self.rng.uniform(0.2, 1.0))
        except BaseException as exc:  # reported by the test thread
            self.error = exc


@pytest.mark.slow
def test_node_killed_ten_times_during_multi_study_send(
    tmp_path: Path, worker_processes: Callable[[Path, Path], WorkerProcess]
) -> None:
    """Kill -9 the node 10 times (seeded random moments), restart it each time; all ends once."""
    rng = random.Random(SEED)
    cfg = fault_config(tmp_path, study={"quiet_seconds": 2.0})
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    studies = {}
    for i in range(STUDIES):
        uid, files = cxr_study(tmp_path / f"study{i}", IMAGES, offset=i * IMAGES)
        studies[uid] = files

    worker_processes(config, tmp_path / "worker.log")
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    senders = [Modality(port, files, random.Random(rng.random())) for files in studies.values()]
    try:
        for sender in senders:
            sender.start()
        while_sending = 0
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 2.0))
            while_sending += any(s.is_alive() for s in senders)
            node.kill9()
            node.start()
        for sender in senders:
            sender.join(timeout=300)
            assert sender.error is None, sender.error
            assert not sender.is_alive(), "a sender never got everything acknowledged"
        refused = [a for s in senders for a in s.refused]
        print(f"{while_sending}/{KILLS} kills while sending; refusals: {refused}")

        engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
        try:
            done = wait_all_done(engine, set(studies), timeout=300)
            print("study versions:", sorted(s.version for s in done.values()))
            acknowledged = {sop_uid(f): f for s in senders for f in s.acknowledged}
            assert len(acknowledged) == STUDIES * IMAGES
            assert_stored_once(tmp_path / "var", engine, acknowledged)
            for uid, files in studies.items():
                assert set(done[uid].instances) == {sop_uid(f) for f in files}
            assert_processed_once(
                engine, tmp_path / "var", done, set(studies), kinds={"classification"}
            )
        finally:
            engine.dispose()
    finally:
        node.stop()
