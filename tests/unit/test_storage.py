"""The instance store: atomic writes, a free-space floor, quarantine with reasons."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import pytest

from node import storage
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


# -- direct I/O staging ------------------------------------------------------------------
CHUNK = storage._DIRECT_CHUNK
#: Empty, under a block, block edges, a CT image, and the chunk edges of the aligned buffer.
SIZES = [0, 1, 4095, 4096, 4097, 525_816, CHUNK - 1, CHUNK, CHUNK + 4097]


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.fixture
def opened_flags(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The flags of every file the store opens for writing."""
    flags: list[int] = []
    real_open = os.open

    def recording_open(path: Any, flag: int, mode: int = 0o777, **kw: Any) -> int:
        if flag & os.O_WRONLY:
            flags.append(flag)
        return real_open(path, flag, mode, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    return flags


@pytest.mark.parametrize("size", SIZES)
def test_direct_io_stages_every_size_byte_identical(
    tmp_path: Path, size: int, opened_flags: list[int]
) -> None:
    store = InstanceStore(tmp_path)
    data = _payload(size)
    staged = store.stage(data)
    assert staged.path.read_bytes() == data and staged.size_bytes == size
    assert store.direct_io, "this file system takes O_DIRECT; the store must still use it"
    assert opened_flags and all(f & os.O_DIRECT for f in opened_flags)


def test_direct_io_off_writes_through_the_page_cache(
    tmp_path: Path, opened_flags: list[int]
) -> None:
    store = InstanceStore(tmp_path, direct_io=False)
    data = _payload(525_816)
    assert store.stage(data).path.read_bytes() == data
    assert opened_flags and not any(f & os.O_DIRECT for f in opened_flags)


def test_file_system_refusing_o_direct_falls_back_once_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open
    refused: list[int] = []

    def no_direct(path: Any, flag: int, mode: int = 0o777, **kw: Any) -> int:
        if flag & os.O_DIRECT:
            refused.append(flag)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flag, mode, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    store = InstanceStore(tmp_path)
    with caplog.at_level(logging.INFO, logger="node.storage"):
        first, second = _payload(4097), _payload(525_816)
        assert store.stage(first).path.read_bytes() == first
        assert store.stage(second).path.read_bytes() == second
    assert len(refused) == 1 and not store.direct_io  # asked once, then buffered for good
    assert "O_DIRECT refused at open" in caplog.text


@pytest.mark.parametrize("failing_call", [1, 2])
def test_direct_write_refused_midway_is_finished_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    """EINVAL on the first or a later chunk: the bytes already written stay, the rest follows."""
    real_pwrite = os.pwrite
    calls = 0

    def refusing(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    store = InstanceStore(tmp_path)
    data = _payload(CHUNK + 4097)
    assert store.stage(data).path.read_bytes() == data
    assert not store.direct_io


def test_short_direct_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that takes fewer bytes than asked (not a block multiple) loses nothing."""
    real_pwrite = os.pwrite
    shortened = False

    def short_once(fd: int, data: Any, offset: int) -> int:
        nonlocal shortened
        if not shortened and len(data) > 8192:
            shortened = True
            return real_pwrite(fd, memoryview(data)[:8192], offset) - 1000
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", short_once)
    store = InstanceStore(tmp_path)
    data = _payload(525_816)
    assert store.stage(data).path.read_bytes() == data
    assert shortened and store.direct_io  # a short write is not a refusal of O_DIRECT


def test_disk_full_during_direct_write_is_out_of_resources_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    store = InstanceStore(tmp_path)
    with pytest.raises(OutOfResources) as info:
        store.stage(_payload(525_816))
    assert info.value.status == status.OUT_OF_RESOURCES_DISK
    assert list(store.tmp_dir.iterdir()) == []
