"""Caller policy: known AE titles (optionally per host/network), and the node itself on loopback."""

from __future__ import annotations

from node.config import AllowedCaller
from node.ingest.callers import CallerPolicy


def test_policy() -> None:
    policy = CallerPolicy(
        [AllowedCaller(ae_title="CT1"), AllowedCaller(ae_title="MR1", host="10.0.0.0/8")],
        own_ae_title="TRIAGE",
    )
    assert policy.admits("CT1", "192.0.2.1")
    assert policy.admits("CT1  ", "192.0.2.1")  # AE titles are space-padded on the wire
    assert policy.admits("MR1", "10.20.30.40")
    assert not policy.admits("MR1", "192.0.2.1")
    assert not policy.admits("UNKNOWN", "127.0.0.1")
    assert policy.admits("TRIAGE", "127.0.0.1")
    assert not policy.admits("TRIAGE", "192.0.2.1")
