"""Numbers in URLs beyond what the database holds are refused (422), not a 500.

An offset or rules version of 10**20 overflowed the database integer (SQLite:
OverflowError, PostgreSQL: out of range): an internal error with a traceback in the
log for anyone logged in.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.unit.web.test_web_api import login

HUGE = str(10**20)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/?offset={HUGE}"),
        ("GET", f"/worklist/rows?offset={HUGE}"),
        ("GET", f"/api/worklist?offset={HUGE}"),
        ("GET", f"/admin/audit?offset={HUGE}"),
        ("GET", f"/api/audit?offset={HUGE}"),
        ("GET", f"/api/rules/versions/{HUGE}"),
        ("POST", f"/api/rules/versions/{HUGE}/activate"),
        ("POST", f"/admin/rules/versions/{HUGE}/activate"),
    ],
)
def test_numbers_too_large_for_the_database_are_refused(
    client: TestClient, method: str, path: str
) -> None:
    token = login(client, "admin")
    r = client.request(method, path, data={"csrf_token": token} if method == "POST" else None)
    assert r.status_code == 422, (r.status_code, r.text[:200])
