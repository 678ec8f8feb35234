"""The worker's view of storage: the node's disk, or the node over HTTP.

* :class:`SharedStorage`: the node's ``data_dir`` is mounted here; instances are
  read in place and results written with the node's durable, atomic writes.
* :class:`DicomwebStorage`: no shared disk. Instances are fetched from the node by
  DICOMweb WADO-RS (``dicomweb-client``, bearer token ``cluster.token``) into a
  bounded local :class:`InstanceCache`; results are uploaded with
  ``PUT /internal/v1/files/results/...`` (see :mod:`node.web.internal`).

``worker.storage = "auto"`` picks per study: shared when the study's instance files
are under the local ``data_dir``, otherwise DICOMweb.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Protocol, TypeVar

import requests
from dicomweb_client import DICOMwebClient

from node.config import Settings
from node.errors import NodeError
from node.storage import InstanceStore

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Lock stripes of the cache: a fixed set of lock files, never deleted (no unlink races).
_STRIPES = 64
_T = TypeVar("_T")


class StorageUnavailable(NodeError):
    """The worker cannot reach the instances or the place results go."""


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One stored instance: its UIDs and its path relative to the node's data_dir."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: str


class WorkerStorage(Protocol):
    """Where a worker reads a study's instances and writes its results."""

    kind: str

    def instance(self, ref: InstanceRef) -> contextlib.AbstractContextManager[Path]:
        """A local file holding the instance, valid inside the ``with`` block."""

    def write_result(self, relative_path: str, data: bytes) -> None:
        """Store a result file at ``relative_path`` (under ``results/``) on the node."""

    def read_result(self, relative_path: str) -> bytes:
        """A result file written earlier (e.g. an earlier version's report)."""


class SharedStorage:
    """Today's behaviour: the node's instance store on a shared or local disk."""

    kind = "shared"

    def __init__(self, store: InstanceStore) -> None:
        self.store = store

    @contextlib.contextmanager
    def instance(self, ref: InstanceRef) -> Iterator[Path]:
        yield self.store.path(ref.path)

    def has(self, ref: InstanceRef) -> bool:
        return self.store.exists(ref.path)

    def write_result(self, relative_path: str, data: bytes) -> None:
        self.store.write(relative_path, data)

    def read_result(self, relative_path: str) -> bytes:
        return self.store.read(relative_path)


class InstanceCache:
    """Files fetched from the node, bounded in bytes, least recently used evicted.

    Safe for several processes (Celery prefork) sharing one directory: a fetch
    holds its key's stripe lock exclusively, so an instance is fetched once; a
    reader holds it shared while it reads, so the evicting process (which only
    takes stripes it can lock at once) never removes a file in use. Files appear
    by atomic rename only; a hit refreshes the file's times (the LRU order).
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.files_dir = directory / "instances"
        self.locks_dir = directory / "locks"
        self.tmp_dir = directory / "tmp"
        for d in (self.files_dir, self.locks_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.fetches = 0  # in this process; for metrics and tests

    def path_of(self, key: str) -> Path:
        if not _UID.match(key) or len(key) > 64:
            raise ValueError("cache keys are UIDs")
        return self.files_dir / f"{key}.dcm"

    @contextlib.contextmanager
    def use(self, key: str, fetch: Callable[[], bytes]) -> Iterator[Path]:
        """The cached file of ``key``, fetched with ``fetch`` first when missing."""
        path = self.path_of(key)
        stripe = self._stripe(key)
        fetched = False
        with self._lock_file(stripe) as lock:
            while True:
                fcntl.flock(lock, fcntl.LOCK_SH)
                if path.is_file():
                    break
                fcntl.flock(lock, fcntl.LOCK_EX)  # (re-)fetch under the exclusive lock
                if not path.is_file():
                    self._store(path, fetch())
                    fetched = True
                # Downgrade; the file may be evicted in the gap, hence the loop.
            with contextlib.suppress(OSError):
                os.utime(path)
            if fetched:  # only a fetch makes the cache grow
                self._evict(keep=path, held_stripe=stripe)
            yield path

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    # -- internals ---------------------------------------------------------------------
    def _store(self, path: Path, data: bytes) -> None:
        tmp = self.tmp_dir / f"{path.name}.{secrets.token_hex(6)}.part"
        try:
            with tmp.open("xb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.fetches += 1

    def _stripe(self, key: str) -> int:
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % _STRIPES

    @contextlib.contextmanager
    def _lock_file(self, stripe: int) -> Iterator[IO[bytes]]:
        with (self.locks_dir / f"{stripe:02d}.lock").open("ab") as fh:
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _entries(self) -> list[tuple[Path, int, float]]:
        entries = []
        for entry in os.scandir(self.files_dir):
            if entry.name.endswith(".dcm"):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    entries.append((Path(entry.path), st.st_size, st.st_mtime))
        return entries

    def _evict(self, *, keep: Path, held_stripe: int) -> None:
        """Remove least recently used files until the cache fits ``max_bytes``.

        One process evicts at a time (the others skip); a file whose stripe is
        locked by anyone (a reader, a fetch, or ourselves) is left for later.
        """
        with (self.locks_dir / "evict.lock").open("ab") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            entries = self._entries()
            total = sum(size for _, size, _ in entries)
            if total <= self.max_bytes:
                return
            for path, size, _ in sorted(entries, key=lambda e: e[2]):
                if total <= self.max_bytes:
                    break
                stripe = self._stripe(path.stem)
                if path == keep or stripe == held_stripe:
                    continue
                with self._lock_file(stripe) as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    path.unlink(missing_ok=True)
                    total -= size
            if total > self.max_bytes:
                log.debug("worker cache above its bound: files in use (%d bytes)", total)


class DicomwebStorage:
    """Instances by WADO-RS from the node, results uploaded to it."""

    kind = "dicomweb"

    def __init__(
        self,
        node_url: str,
        token: str,
        cache: InstanceCache,
        *,
        attempts: int = 5,
        backoff_seconds: float = 0.5,
        timeout_seconds: float = 60.0,
    ) -> None:
        if not node_url or not token:
            raise StorageUnavailable(
                "fetching instances over DICOMweb needs cluster.node_url and cluster.token "
                "(TRIAGE_NODE_CLUSTER__TOKEN or cluster.token_file)"
            )
        self.base_url = node_url.rstrip("/")
        self.cache = cache
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self.client = DICOMwebClient(
            url=f"{self.base_url}/dicomweb", session=self._session, timeout=timeout_seconds
        )
        # One retry policy (ours, below), not the library's second one on top of it.
        self.client.set_http_retry_params(retry=False)

    @contextlib.contextmanager
    def instance(self, ref: InstanceRef) -> Iterator[Path]:
        with self.cache.use(ref.sop_uid, lambda: self._fetch(ref)) as path:
            yield path

    def _fetch(self, ref: InstanceRef) -> bytes:
        def get() -> bytes:
            ds = self.client.retrieve_instance(
                ref.study_uid,
                ref.series_uid,
                ref.sop_uid,
                media_types=(("application/dicom", "*"),),
            )
            out = BytesIO()
            ds.save_as(out, enforce_file_format=True)
            return out.getvalue()

        data = self._retrying(f"fetch sop_instance_uid={ref.sop_uid}", get)
        log.debug("fetched sop_instance_uid=%s (%d bytes)", ref.sop_uid, len(data))
        return data

    def write_result(self, relative_path: str, data: bytes) -> None:
        url = f"{self.base_url}/internal/v1/files/{relative_path}"

        def put() -> None:
            response = self._session.put(
                url,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=self.timeout_seconds,
            )
            response.raise_for_status()

        self._retrying(f"upload {relative_path}", put)

    def read_result(self, relative_path: str) -> bytes:
        """The result file; FileNotFoundError when the node has none (e.g. purged)."""

        def get() -> bytes:
            response = self._session.get(
                f"{self.base_url}/internal/v1/files/{relative_path}", timeout=self.timeout_seconds
            )
            if response.status_code == 404:
                raise FileNotFoundError(relative_path)
            response.raise_for_status()
            return response.content

        return self._retrying(f"read {relative_path}", get)

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()``, again after connection errors and 5xx answers (doubling delays)."""
        delay = self.backoff_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status < 500 or attempt == self.attempts:
                    raise StorageUnavailable(f"{what}: node answered HTTP {status}") from None
                reason = f"HTTP {status}"
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.attempts:
                    raise StorageUnavailable(
                        f"{what}: node unreachable ({type(exc).__name__})"
                    ) from None
                reason = type(exc).__name__
            log.warning("%s failed (%s), attempt %d of %d", what, reason, attempt, self.attempts)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


class AutoStorage:
    """``worker.storage = "auto"``: shared when the study's files are here, else DICOMweb."""

    kind = "auto"

    def __init__(self, shared: SharedStorage, remote: Callable[[], DicomwebStorage]) -> None:
        self.shared = shared
        self._remote_factory = remote
        self._remote: DicomwebStorage | None = None

    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage:
        if all(self.shared.has(ref) for ref in refs):
            return self.shared
        if self._remote is None:
            try:
                self._remote = self._remote_factory()
            except StorageUnavailable as exc:
                raise StorageUnavailable(
                    f"the study's instance files are not under {self.shared.store.data_dir}, "
                    f"and {exc}"
                ) from None
        return self._remote


class StorageChooser(Protocol):
    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage: ...


class _Fixed:
    def __init__(self, storage: WorkerStorage) -> None:
        self.storage = storage
        self.kind = storage.kind

    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage:
        return self.storage


def cache_dir(settings: Settings) -> Path:
    return settings.worker.cache_dir or settings.storage.data_dir / "worker-cache"


def storage_from_settings(settings: Settings) -> StorageChooser:
    """The storage ``worker.storage`` asks for; a DICOMweb one without URL or token fails here."""
    mode = settings.worker.storage

    def shared() -> SharedStorage:
        return SharedStorage(
            InstanceStore(
                settings.storage.data_dir,
                fsync=settings.storage.fsync,
                direct_io=settings.storage.direct_io,
            )
        )

    def remote() -> DicomwebStorage:
        cluster = settings.cluster
        if not cluster.node_url or not cluster.token:
            raise StorageUnavailable(
                "worker.storage needs cluster.node_url and cluster.token to fetch instances "
                "over DICOMweb (token: TRIAGE_NODE_CLUSTER__TOKEN or cluster.token_file)"
            )
        return DicomwebStorage(
            cluster.node_url,
            cluster.token,
            InstanceCache(cache_dir(settings), settings.worker.cache_max_bytes),
        )

    if mode == "shared":
        return _Fixed(shared())
    if mode == "dicomweb":
        return _Fixed(remote())
    return AutoStorage(shared(), remote)
