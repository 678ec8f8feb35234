"""Study completion: a study is complete when no instance arrived for ``quiet_seconds``.

The state lives in the database (``last_received_at``), not in memory, so a
restarted node completes the studies it was receiving when it stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from node.catalog import Catalog, CompletedStudy

log = logging.getLogger(__name__)

CompletionHook = Callable[[Sequence[CompletedStudy]], None]


class CompletionMonitor:
    """Background thread that completes quiet studies and hands them to hooks."""

    def __init__(
        self,
        catalog: Catalog,
        quiet_seconds: float,
        interval_seconds: float = 1.0,
        hooks: Sequence[CompletionHook] = (),
    ) -> None:
        self.catalog = catalog
        self.quiet_seconds = quiet_seconds
        self.interval = min(interval_seconds, max(quiet_seconds / 2, 0.05))
        self.hooks = list(hooks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Sequence[CompletedStudy]:
        done = self.catalog.complete_quiet_studies(self.quiet_seconds)
        if done:
            for hook in self.hooks:
                try:
                    hook(done)
                except Exception:
                    log.exception("completion hook %r failed", hook)
        return done

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except SQLAlchemyError as exc:
                log.error("completion check failed error=%s; retrying", type(exc).__name__)
            except Exception:
                log.exception("completion check failed; retrying")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="study-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
