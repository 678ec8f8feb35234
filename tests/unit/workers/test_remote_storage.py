"""The worker's instance cache and storage choice (workers.storage), without TensorFlow.

The cache is exercised by real processes sharing one directory, as Celery prefork
workers do.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from node.config import Settings
from node.storage import InstanceStore
from workers.storage import (
    AutoStorage,
    DicomwebStorage,
    InstanceCache,
    InstanceRef,
    SharedStorage,
    StorageUnavailable,
    storage_from_settings,
)

KB = 1000


def _keys(cache: InstanceCache, n: int) -> list[str]:
    """``n`` UID keys in distinct lock stripes (so eviction order is pure LRU)."""
    keys: list[str] = []
    seen: set[int] = set()
    i = 0
    while len(keys) < n:
        i += 1
        key = f"1.2.826.0.1.3680043.10.1234.{i}"
        if cache._stripe(key) not in seen:
            seen.add(cache._stripe(key))
            keys.append(key)
    return keys


def _payload(key: str, size: int = KB) -> bytes:
    return (hashlib.sha256(key.encode()).digest() * (size // 32 + 1))[:size]


def _get(cache: InstanceCache, key: str, size: int = KB) -> bytes:
    with cache.use(key, lambda: _payload(key, size)) as path:
        return path.read_bytes()


def _must_not_fetch() -> bytes:
    raise AssertionError("a cached instance was fetched again")


def test_cache_stays_within_its_bound_and_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", max_bytes=3 * KB)
    a, b, c, d, e = _keys(cache, 5)
    for key in (a, b, c):
        assert _get(cache, key) == _payload(key)
    assert cache.fetches == 3 and cache.total_bytes() == 3 * KB

    with cache.use(a, _must_not_fetch) as path:  # a hit makes a the most recently used
        assert path.read_bytes() == _payload(a)
    _get(cache, d)  # over the bound: b, the least recently used, goes
    assert cache.fetches == 4
    assert not cache.path_of(b).exists()
    assert all(cache.path_of(k).exists() for k in (a, c, d))
    assert cache.total_bytes() <= 3 * KB

    _get(cache, e, size=2 * KB)  # needs two slots: c, then a
    assert [k for k in (a, b, c, d, e) if cache.path_of(k).exists()] == [d, e]
    assert cache.total_bytes() <= 3 * KB
    assert _get(cache, b) == _payload(b)  # an evicted instance is simply fetched again
    assert cache.fetches == 6
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_a_file_in_use_is_not_evicted(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", max_bytes=2 * KB)
    a, b, c = _keys(cache, 3)
    with cache.use(a, lambda: _payload(a)) as in_use:
        _get(cache, b)
        _get(cache, c)  # a is the oldest, but someone reads it
        assert in_use.read_bytes() == _payload(a)
    assert not cache.path_of(b).exists()
    assert cache.path_of(c).exists()


def test_a_single_instance_larger_than_the_bound_is_still_served(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path / "cache", max_bytes=KB)
    (a,) = _keys(cache, 1)
    assert _get(cache, a, size=5 * KB) == _payload(a, 5 * KB)


def _worker(directory: str, key: str, log: str, barrier: object, out: object) -> None:
    """One prefork process: wait for the others, then ask for the same instance."""

    def fetch() -> bytes:
        with open(log, "ab") as fh:  # O_APPEND: one line per fetch, whoever does it
            fh.write(f"{os.getpid()}\n".encode())
        time.sleep(0.3)  # a slow network widens the window for a double fetch
        return _payload(key, 64 * KB)

    cache = InstanceCache(Path(directory), max_bytes=10 * 64 * KB)
    barrier.wait()  # type: ignore[attr-defined]
    with cache.use(key, fetch) as path:
        out.put(hashlib.sha256(path.read_bytes()).hexdigest())  # type: ignore[attr-defined]


def test_processes_sharing_the_cache_fetch_an_instance_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    key = "1.2.826.0.1.3680043.10.1234.4711"
    log = tmp_path / "fetches.log"
    log.touch()
    procs = [
        ctx.Process(target=_worker, args=(str(tmp_path / "cache"), key, str(log), barrier, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    digests = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1
    assert set(digests) == {hashlib.sha256(_payload(key, 64 * KB)).hexdigest()}
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def _settings(tmp_path: Path, **worker: object) -> Settings:
    return Settings.model_validate(
        {"storage": {"data_dir": str(tmp_path / "var")}, "worker": worker}
    )


def test_dicomweb_mode_needs_node_url_and_token(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable, match=r"cluster\.node_url and cluster\.token"):
        storage_from_settings(_settings(tmp_path, storage="dicomweb"))


def test_auto_mode_reads_local_files_and_says_clearly_when_it_cannot(tmp_path: Path) -> None:
    chooser = storage_from_settings(_settings(tmp_path))
    assert isinstance(chooser, AutoStorage)
    store = InstanceStore(tmp_path / "var", fsync=False)
    here = InstanceRef("1.2.3", "1.2.3.1", "1.2.3.1.1", "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm")
    store.write(here.path, b"DICM")
    storage = chooser.for_study([here])
    assert isinstance(storage, SharedStorage)
    with storage.instance(here) as path:
        assert path.read_bytes() == b"DICM"

    elsewhere = InstanceRef(
        "1.2.3", "1.2.3.1", "1.2.3.1.2", "instances/1.2.3/1.2.3.1/1.2.3.1.2.dcm"
    )
    with pytest.raises(StorageUnavailable, match=r"not under .*cluster.node_url"):
        chooser.for_study([here, elsewhere])


def test_an_unreachable_node_is_retried_then_reported(tmp_path: Path) -> None:
    from tests.nodes import free_port

    storage = DicomwebStorage(
        f"http://127.0.0.1:{free_port()}",
        "token",
        InstanceCache(tmp_path / "cache", KB),
        attempts=3,
        backoff_seconds=0.01,
    )
    with pytest.raises(StorageUnavailable, match="unreachable"):
        storage.write_result("results/1.2.3/v1/x.npy", b"x")
    ref = InstanceRef("1.2.3", "1.2.3.1", "1.2.3.1.1", "instances/1.2.3/1.2.3.1/1.2.3.1.1.dcm")
    with pytest.raises(StorageUnavailable, match="unreachable"), storage.instance(ref):
        pass
    assert list((tmp_path / "cache" / "instances").iterdir()) == []
