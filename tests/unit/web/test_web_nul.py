"""A NUL character from a request never reaches the database.

PostgreSQL text cannot hold one: the query fails, the caller gets a 500 and the log a
traceback, for anyone who sends ``%00`` (the login needs no account). No UID, user
name, search or filter of the node has one, so such a request is refused up front.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from node.runtime import Node
from tests.unit.web.test_web_api import add_study, login


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/", {"q": "PID\x00"}),
        ("/api/worklist", {"q": "\x00"}),
        ("/api/worklist", {"modality": "CR\x00"}),
        ("/api/audit", {"user": "\x00"}),
        ("/admin/audit", {"study_uid": "1.2\x00"}),
        ("/studies/1.2%003", {}),
        ("/api/studies/1.2%003", {}),
    ],
)
def test_a_nul_in_the_url_is_refused(
    client: TestClient, node: Node, path: str, params: dict[str, str]
) -> None:
    add_study(node)
    login(client, "admin")
    r = client.get(path, params=params)
    assert r.status_code == 400, (r.status_code, r.text[:200])


def test_a_login_name_with_a_nul_is_a_wrong_login(client: TestClient) -> None:
    r = client.post("/api/session", json={"name": "rad\x00", "password": "whatever-1"})
    assert r.status_code == 401


def test_the_refusal_carries_the_security_headers(client: TestClient) -> None:
    r = client.get("/login", params={"next": "/\x00"})
    assert r.status_code == 400
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
