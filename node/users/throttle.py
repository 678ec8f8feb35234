"""Throttling of failed logins per account name and per client address.

The counts live in this process's memory: a restart forgets them, and web nodes
behind a load balancer each count their own attempts (so an attacker spread over
``n`` nodes gets ``n`` times the attempts). That is enough to turn an online
password search from thousands of guesses a minute into a handful an hour.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

#: More keys than this: forget those without a recent failure (bounds the memory).
_PRUNE_ABOVE = 10_000


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Lock:
    """A key just locked by a failure: which, and for how many seconds."""

    key: str
    seconds: int


class LoginThrottle:
    """Refuse logins for a while after repeated failures of a name or from an address.

    ``max_failures`` failures of one name (``max_failures_per_address`` from one
    address) within ``window`` seconds lock it for ``lockout`` seconds; each further
    failure doubles that, up to ``window``. A successful login clears its name's
    failures, never its address's (one valid account must not reset a guesser's count).
    """

    def __init__(
        self,
        *,
        max_failures: int,
        max_failures_per_address: int,
        window: float,
        lockout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"name": max_failures, "address": max_failures_per_address}
        self._window = window
        self._lockout = lockout
        self._clock = clock
        self._keys: dict[tuple[str, str], _Failures] = {}
        self._lock = threading.Lock()

    def retry_after(self, name: str | None, address: str | None) -> int | None:
        """Seconds until ``name`` and ``address`` may try again; None if they may now."""
        now = self._clock()
        with self._lock:
            waits = [
                entry.locked_until - now
                for key in _keys(name, address)
                if (entry := self._keys.get(key)) is not None and entry.locked_until > now
            ]
        return max(1, round(max(waits))) if waits else None

    def failed(self, name: str | None, address: str | None) -> list[Lock]:
        """Count a failed login; the keys it locks (name, address) with their delays."""
        now = self._clock()
        locks = []
        with self._lock:
            self._prune(now)
            for key in _keys(name, address):
                entry = self._keys.setdefault(key, _Failures())
                while entry.times and entry.times[0] <= now - self._window:
                    entry.times.popleft()
                entry.times.append(now)
                excess = len(entry.times) - self._limits[key[0]]
                if excess >= 0:
                    seconds = min(self._lockout * 2 ** min(excess, 32), self._window)
                    entry.locked_until = now + seconds
                    locks.append(Lock(key[0], round(seconds)))
        return locks

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._keys.pop(("name", name), None)

    def _prune(self, now: float) -> None:
        if len(self._keys) > _PRUNE_ABOVE:
            for key, entry in list(self._keys.items()):
                if entry.locked_until <= now and entry.times[-1] <= now - self._window:
                    del self._keys[key]


def _keys(name: str | None, address: str | None) -> list[tuple[str, str]]:
    return [(kind, key) for kind, key in (("name", name), ("address", address)) if key]
