"""The instance store: atomic writes, a free-space floor, quarantine with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.errors import OutOfResources
from node.ingest import status
from node.storage import InstanceStore


def test_write_is_atomic_and_complete(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    rel = store.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    stored = store.write(rel, b"DICM" * 1000)
    assert store.read(rel) == b"DICM" * 1000
    assert stored.size_bytes == 4000 and len(stored.sha256) == 64
    assert list(store.tmp_dir.iterdir()) == []  # no temp file left behind
    store.write(rel, b"new")  # replaces atomically
    assert store.read(rel) == b"new"


def test_staged_bytes_are_placed_or_discarded(tmp_path: Path) -> None:
    """The SCP stages bytes before it knows their place; unplaced ones leave nothing."""
    store = InstanceStore(tmp_path)
    staged = store.stage(b"DICM" * 10)
    assert staged.path.parent == store.tmp_dir and staged.path.read_bytes() == b"DICM" * 10
    rel = store.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    store.place(staged, rel)
    assert store.read(rel) == b"DICM" * 10 and staged.placed
    store.discard(staged)  # placed: nothing to remove, the file stays
    assert store.exists(rel)

    duplicate = store.stage(b"other bytes")
    store.discard(duplicate)
    assert store.read(rel) == b"DICM" * 10
    assert list(store.tmp_dir.iterdir()) == []
    # A crash between stage and place leaves a .part file: removed at the next start.
    store.stage(b"interrupted")
    assert InstanceStore(tmp_path).discard_partial_writes() == 1


def test_refuses_below_free_space_floor_before_writing(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(OutOfResources) as info:
        store.ensure_space(1000)
    assert info.value.status == status.OUT_OF_RESOURCES_DISK == 0xA700


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    rel = store.quarantine(b"broken", {"reason": "dataset cannot be parsed", "status": 0xC001})
    assert store.read(rel) == b"broken"
    sidecar = json.loads(store.path(rel).with_suffix(".json").read_text())
    assert sidecar["reason"] == "dataset cannot be parsed"
    assert sidecar["size_bytes"] == 6
