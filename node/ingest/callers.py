"""Who may open an association with the node (PS3.8 7.1.1.3 calling AE title)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from node.config import AllowedCaller


class CallerPolicy:
    """Admit known calling AE titles, optionally only from configured hosts/networks.

    The node's own AE title is also admitted from loopback, so that the node and
    its command-line tools can verify the listener (C-ECHO) on any config.
    """

    def __init__(self, allowed: Sequence[AllowedCaller], own_ae_title: str) -> None:
        self._allowed = list(allowed)
        self._own = own_ae_title.strip()

    def admits(self, calling_ae_title: str, address: str) -> bool:
        title = calling_ae_title.strip()
        if title == self._own and _is_loopback(address):
            return True
        return any(rule.admits(title, address) for rule in self._allowed)

    def __str__(self) -> str:
        return ", ".join(str(rule) for rule in self._allowed) or "(nobody)"


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
