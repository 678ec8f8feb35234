"""The data disk fills up in the middle of a study (a small tmpfs as ``storage.data_dir``).

Three modalities send parts of one study at once onto a disk with room for only a
few of its images (a filler file takes the rest; ``storage.min_free_bytes`` is
small). The database and the broker live elsewhere, so the disk is the only
fault. Instances that do not fit are refused either before anything is written
(free space below the minimum) or when a concurrent write hits ENOSPC.

Proves: every refusal is 0xA700 (out of resources), never Success and never
another status; no partial or temporary file stays in the data directory; the
database holds exactly the acknowledged instances, each whole on disk; once the
filler is deleted, re-sending the refused instances succeeds and the study is
processed (its results written to the same disk) exactly once.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from tests.faults.conftest import (
    WorkerProcess,
    assert_processed_once,
    assert_stored_once,
    cxr_study,
    fault_config,
    sop_uid,
    wait_all_done,
)
from tests.nodes import NodeProcess, write_config
from tests.peers import SendReport, dcmsend

TMPFS_BYTES = 16 * 1024 * 1024
MIN_FREE = 16 * 1024
IMAGES = 12
SENDERS = 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted under ``tmp_path`` (needs root / CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def send_in_parallel(port: int, parts: list[list[Path]]) -> list[SendReport]:
    reports: list[list[SendReport]] = [[] for _ in parts]

    def run(i: int) -> None:
        reports[i] = dcmsend(port, parts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [r for part in reports for r in part]


@pytest.mark.slow
def test_disk_full_mid_study_refused_cleanly_then_recovers(
    tmp_path: Path,
    small_disk: Path,
    worker_processes: Callable[[Path, Path], WorkerProcess],
) -> None:
    """0xA700 when full, no partial files, rows = acknowledged; space back -> study done once."""
    data_dir = small_disk / "var"
    cfg = fault_config(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        storage={"data_dir": str(data_dir), "min_free_bytes": MIN_FREE},
        pipeline={"broker_url": f"sqla+sqlite:///{tmp_path / 'broker.db'}"},
        study={"quiet_seconds": 3.0},
    )
    config = write_config(tmp_path / "node.toml", cfg)
    port = cfg["dicom"]["port"]
    uid, files = cxr_study(tmp_path / "study", IMAGES)
    image_bytes = max(f.stat().st_size for f in files)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    engine = create_engine(cfg["database"]["url"])
    try:
        worker_processes(config, tmp_path / "worker.log")
        # Leave room for about three images above the minimum, then send all twelve.
        room = MIN_FREE + 3 * image_bytes + image_bytes // 2
        filler = small_disk / "filler"
        with filler.open("wb") as fh:
            fh.write(b"\0" * (shutil.disk_usage(small_disk).free - room))
        reports = send_in_parallel(port, [files[i::SENDERS] for i in range(SENDERS)])
        assert len(reports) == IMAGES, reports
        stored = [r for r in reports if r.code == 0x0000]
        refused = [r for r in reports if r.code != 0x0000]
        assert 1 <= len(stored) < IMAGES and refused, [r.status for r in reports]
        assert {r.code for r in refused} == {0xA700}, [r.status for r in refused]
        acknowledged = {r.sop_instance_uid: r.filename for r in stored}
        assert_stored_once(data_dir, engine, acknowledged, exact=True)  # rows = acknowledged
        assert list((data_dir / "quarantine").iterdir()) == []  # refused, not quarantined

        filler.unlink()
        retry = send_in_parallel(port, [[r.filename for r in refused]])
        assert {r.code for r in retry} == {0x0000}, [r.status for r in retry]

        done = wait_all_done(engine, {uid})
        assert set(done[uid].instances) == {sop_uid(f) for f in files}
        assert_stored_once(data_dir, engine, {sop_uid(f): f for f in files}, exact=True)
        assert_processed_once(engine, data_dir, done, {uid}, kinds={"classification"})
        log = (tmp_path / "node.log").read_text()
        print(
            f"stored {len(stored)} refused {len(refused)};",
            f"{log.count('disk full while writing')} refused mid-write (ENOSPC)",
        )
    finally:
        engine.dispose()
        node.stop()
