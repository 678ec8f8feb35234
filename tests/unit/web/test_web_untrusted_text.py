"""Text from outside (a URL, a login name, a worklist filter) where people read it later:
the node's log and the audit trail's CSV export opened in a spreadsheet."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from node.runtime import Node
from node.web.audit import AuditRecord, csv_lines
from node.web.internal import create_internal_app
from tests.unit.web.test_web_api import login

#: What a spreadsheet reads as the start of a formula (OWASP CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
TOKEN = "untrusted-text-test-token-0123456789"


def _formulas_after_semicolons(text: str) -> list[str]:
    """The cells a spreadsheet that splits at every ';' would read as formulas (quotes
    or not: the stricter reading)."""
    return [p for p in text.split(";")[1:] if p.lstrip(' "').startswith(FORMULA_START)]


def test_a_refused_internal_request_logs_no_control_characters(
    start_node: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can send a path; terminal escapes in it (ESC [2K: erase the line, ESC [1A:
    up one) would let them rewrite what an operator sees in ``journalctl`` or ``less -R``."""
    node = start_node(cluster={"token": TOKEN})
    client = TestClient(create_internal_app(node))
    with caplog.at_level(logging.WARNING, logger="node.web.internal"):
        r = client.get("/dicomweb/studies/1.2%1B%5B2K%1B%5B1A%07%7Ffake")
    assert r.status_code == 401
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "node.web.internal"]
    assert messages, "the refusal is logged"
    assert not [m for m in messages if any(c < " " or c == "\x7f" for c in m)], messages
    assert "1.2" in messages[0]  # the path is still there, escaped


def test_audit_csv_starts_no_formula_where_spreadsheets_split_at_semicolons(
    client: TestClient,
) -> None:
    """Excel in many locales (de, fr, nl, ...) opens a .csv with ';' as the separator:
    a cell ``x;=cmd|...`` is not quoted by the csv module (no comma in it) and becomes
    two cells there, the second a formula. Anyone can put such a name in the trail by
    failing to log in, and a radiologist such a modality filter in a worklist event."""
    name = "x;=cmd|' /C calc'!A0"
    wrong = {"name": name, "password": "wrong-1"}  # pragma: allowlist secret
    assert client.post("/api/session", json=wrong).is_error
    login(client, "rad")
    assert client.get("/api/worklist", params={"modality": "CR; +SUM(1)"}).is_success
    login(client, "admin")
    text = client.get("/api/audit/export.csv").text
    assert not _formulas_after_semicolons(text)
    for row in csv.reader(io.StringIO(text)):
        assert not [cell for cell in row if cell.startswith(FORMULA_START)], row
    rows = list(csv.reader(io.StringIO(text)))
    assert [r[1] for r in rows if r[2] == "login.failed"] == ["x;'=cmd|' /C calc'!A0"]


@pytest.mark.parametrize("start", FORMULA_START)
def test_every_csv_cell_is_safe_after_a_semicolon(start: str) -> None:
    time = datetime(2026, 1, 1, tzinfo=UTC)
    texts = [f"a;{start}u", f"b; {start}a", f'c;"{start}1', f"d;;{start}c", "e;f"]
    out = "".join(csv_lines([AuditRecord(1, time, *texts)]))
    assert not _formulas_after_semicolons(out)
    assert list(csv.reader(io.StringIO(out)))[1][-1] == "e;f"  # nothing to defuse: unchanged
