"""The login throttle counts every way a browser or script can post the login form.

The per-name lock is what stops a password guesser who rotates client addresses; it
must see the name in every body the login handler accepts, not only in the encoding a
browser uses by default.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.unit.web.test_web_api import PASSWORD, login

GUESS = "guess-123"  # pragma: allowlist secret


def _post(client: TestClient, encoding: str, password: str) -> int:
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    fields = {"name": "rad", "password": password, "csrf_token": token, "next": "/"}
    if encoding == "multipart":  # what <form enctype="multipart/form-data"> sends
        files = {k: (None, v) for k, v in fields.items()}
        return client.post("/login", files=files, follow_redirects=False).status_code
    return client.post("/login", data=fields, follow_redirects=False).status_code


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_the_name_is_locked_however_the_login_form_is_encoded(
    client: TestClient, encoding: str
) -> None:
    assert [_post(client, encoding, GUESS) for _ in range(5)] == [401] * 5
    assert _post(client, encoding, PASSWORD) == 429  # the name is locked: not even tried


def test_a_multipart_login_still_logs_in(client: TestClient) -> None:
    assert _post(client, "multipart", PASSWORD) == 303
    assert client.get("/api/session").json()["name"] == "rad"


def test_an_uppercase_form_content_type_is_refused_before_any_password_check(
    client: TestClient,
) -> None:
    """Not counted by the throttle, so it must not reach the password check either."""
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    body = f"name=rad&password={PASSWORD}&csrf_token={token}"
    kind = {"content-type": "Application/X-WWW-Form-Urlencoded"}
    r = client.post("/login", content=body, headers=kind, follow_redirects=False)
    assert r.status_code == 403


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_the_name_is_locked_however_the_json_login_is_encoded(
    client: TestClient, encoding: str
) -> None:
    """The API reads JSON as bytes (UTF-8, -16 or -32, with or without a BOM); so must
    the throttle, or a guesser's JSON in UTF-16 never locks the name."""

    def post(password: str) -> int:
        body = json.dumps({"name": "rad", "password": password}).encode(encoding)
        kind = {"content-type": "application/json"}
        return client.post("/api/session", content=body, headers=kind).status_code

    assert [post(GUESS) for _ in range(5)] == [401] * 5
    assert post(PASSWORD) == 429


def test_a_non_ascii_csrf_token_is_refused_not_an_error(client: TestClient) -> None:
    """hmac.compare_digest raises on non-ASCII str: a 500 and a traceback in the log
    for anyone who sends one, instead of the 403 of any other wrong token."""
    client.get("/login")
    fields = {"name": "rad", "password": GUESS, "csrf_token": "jeton-\u00e9"}
    assert client.post("/login", data=fields).status_code == 403
    login(client, "rad")
    del client.headers["X-CSRF-Token"]
    latin1 = {"X-CSRF-Token": b"jeton-\xe9"}  # the server reads header bytes as Latin-1
    assert client.delete("/api/session", headers=latin1).status_code == 403
