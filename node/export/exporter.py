"""The exporter: a node thread delivering due exports, one association per destination."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, Settings
from node.db.models import Export
from node.db.types import utcnow
from node.deid import DeidentificationError, Deidentifier
from node.export import deliveries
from node.export.scu import Delivery, Item, Outcome, send, unreadable
from node.observability import metrics
from node.storage import InstanceStore

log = logging.getLogger(__name__)


#: A claim lasts this many export.timeout_seconds: connect, associate and one C-STORE
#: (each bounded by it) fit, and it is renewed before each object while it goes.
_LEASE_TIMEOUTS = 4


@dataclass(slots=True)
class Claim:
    """Deliveries taken for one attempt (:func:`deliveries.claim`).

    Another exporter on the same database (a second node process) skips them while
    the claim holds. It is kept a few timeouts ahead of the send rather than sized for
    the longest batch, so deliveries a killed node was sending go again soon after.
    """

    sessions: sessionmaker[Session]
    ids: list[int]
    until: datetime
    lease: timedelta

    def renew(self) -> None:
        """Push the claim a lease ahead once half of it is gone."""
        now = utcnow()
        if not self.ids or self.until - now > self.lease / 2:
            return
        until = now + self.lease
        try:
            with self.sessions.begin() as session:
                deliveries.extend_claim(session, self.ids, held=self.until, until=until)
        except SQLAlchemyError as exc:
            # The send goes on: at worst another node sends some of them once more.
            log.warning("cannot renew the claim on %d deliveries: %s", len(self.ids), exc)
            return
        self.until = until


class Exporter:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: InstanceStore,
        interval_seconds: float = 1.0,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        with self.sessions() as session:
            due = [(e.destination, e.id) for e in deliveries.due(session, utcnow())]
        by_destination: dict[str, list[int]] = defaultdict(list)
        for name, export_id in due:
            by_destination[name].append(export_id)
        cfg = self.settings.export
        attempted = 0
        for name, ids in by_destination.items():
            exports, claim = self._claim(ids)
            attempted += len(exports)
            if not exports:
                continue
            destination = self.settings.destination(name)
            if destination is None:
                results = [
                    Delivery(Outcome.PERMANENT, None, f"destination {name!r} is not configured")
                ] * len(exports)
                retry_for = timedelta(0)
            else:
                items = [
                    Item(Path(self.store.path(e.path)), e.sop_class_uid, e.sop_instance_uid)
                    for e in exports
                ]
                results = self._send(destination, items, claim.renew)
                retry_for = timedelta(seconds=destination.retry_for_seconds)
            with self.sessions.begin() as session:
                for export, result in zip(exports, results, strict=True):
                    if result.outcome is not Outcome.UNSENT:
                        metrics.EXPORTS.labels(name, result.outcome.value).inc()
                    current = session.get(Export, export.id, with_for_update=True)
                    if current is None or not deliveries.still_as_sent(current, export):
                        log.info(
                            "export re-armed during its attempt sop_instance_uid=%s "
                            "destination=%s kind=%s: the new object goes next",
                            export.sop_instance_uid,
                            name,
                            export.kind,
                        )
                        continue
                    deliveries.record(
                        session,
                        current,
                        result,
                        retry_for=retry_for,
                        initial_backoff=cfg.initial_backoff_seconds,
                        max_backoff=cfg.max_backoff_seconds,
                        max_processing_failures=cfg.max_processing_failures,
                    )
                    log.log(
                        logging.INFO
                        if result.outcome in (Outcome.DELIVERED, Outcome.UNSENT)
                        else logging.WARNING,
                        "export %s sop_instance_uid=%s destination=%s kind=%s: %s",
                        current.state,
                        current.sop_instance_uid,
                        name,
                        current.kind,
                        result.detail,
                    )
        return attempted

    def _claim(self, ids: list[int]) -> tuple[list[Export], Claim]:
        """Take the deliveries ``ids`` for this attempt, as they are now, in that order."""
        now = utcnow()
        lease = timedelta(seconds=self.settings.export.timeout_seconds * _LEASE_TIMEOUTS)
        with self.sessions.begin() as session:
            claimed = deliveries.claim(session, ids, now=now, until=now + lease)
            session.expunge_all()
        order = {export_id: index for index, export_id in enumerate(ids)}
        exports = sorted(claimed, key=lambda e: order[e.id])
        return exports, Claim(self.sessions, [e.id for e in exports], now + lease, lease)

    def _send(
        self,
        destination: Destination,
        items: list[Item],
        heartbeat: Callable[[], None] | None = None,
    ) -> list[Delivery]:
        """Send ``items``; for a ``deidentify`` destination, de-identified copies of them.

        The copies (no PHI left in them) live in a temporary folder under the store's
        ``tmp/`` for the duration of the association only.
        """
        timeout = self.settings.export.timeout_seconds
        calling = self.settings.dicom.ae_title
        if not destination.deidentify:
            return send(
                destination,
                items,
                calling_ae_title=calling,
                timeout=timeout,
                stop=self._stop,
                heartbeat=heartbeat,
            )
        results: list[Delivery | None] = [None] * len(items)
        try:
            deidentifier = Deidentifier(self.settings.privacy.pseudonym_key)
        except DeidentificationError as exc:
            log.error("destination=%s: %s", destination.name, exc)
            return [Delivery(Outcome.PERMANENT, None, str(exc))] * len(items)
        with tempfile.TemporaryDirectory(prefix="deid-", dir=self.store.tmp_dir) as workdir:
            copies: list[tuple[int, Item]] = []
            for index, item in enumerate(items):
                if heartbeat is not None:
                    heartbeat()
                target = Path(workdir) / f"{index}.dcm"
                try:
                    uid = deidentifier.deidentify_file(item.path, target)
                except DeidentificationError as exc:
                    results[index] = Delivery(Outcome.PERMANENT, None, f"cannot de-identify: {exc}")
                    continue
                except OSError as exc:
                    results[index] = unreadable(exc, "cannot de-identify")
                    continue
                copies.append((index, Item(target, item.sop_class_uid, uid)))
            if copies:
                sent = send(
                    destination,
                    [copy for _, copy in copies],
                    calling_ae_title=calling,
                    timeout=timeout,
                    stop=self._stop,
                    heartbeat=heartbeat,
                )
                for (index, _), delivery in zip(copies, sent, strict=True):
                    results[index] = delivery
        return [r for r in results if r is not None]

    def wake(self) -> None:
        """New work was queued: look now rather than at the next interval."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("export cycle failed; retrying")
            self._wake.wait(self.interval)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
