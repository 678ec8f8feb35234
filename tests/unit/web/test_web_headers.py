"""Browser-side defences of the web app: security headers and pages a strict CSP allows.

A page of the node must not be framed by another site (clickjacking of "Roll back",
"Disable model", "Mark as read"), must not have its JSON or text sniffed into HTML,
and must run no script the policy does not name: DICOM strings (patient name, study
description) that ever escaped their escaping would still not run.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from node.runtime import Node
from node.web.app import create_app
from tests.unit.web.test_web_api import add_study, login

#: Every response: no framing, no MIME sniffing, no patient search terms in Referer.
ALWAYS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
_INLINE_HANDLER = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)
_STYLE_ATTRIBUTE = re.compile(r"<[^>]+\sstyle\s*=", re.I)


def _directives(response_csp: str) -> dict[str, str]:
    return {
        d.strip().split(" ", 1)[0]: d.strip().partition(" ")[2]
        for d in response_csp.split(";")
        if d.strip()
    }


def test_every_response_forbids_framing_and_sniffing(client: TestClient, node: Node) -> None:
    uid = add_study(node)
    anonymous = [client.get(p) for p in ("/login", "/static/app.js", "/api/worklist", "/nope")]
    login(client, "admin")
    seen = anonymous + [
        client.get(p)
        for p in ("/", f"/studies/{uid}", "/admin/rules", "/api/worklist", "/docs", "/healthz")
    ]
    for r in seen:
        for name, value in ALWAYS.items():
            assert r.headers.get(name) == value, (r.url, name, r.headers.get(name))
        csp = _directives(r.headers.get("Content-Security-Policy", ""))
        assert csp.get("frame-ancestors") == "'none'", (r.url, csp)


@pytest.mark.parametrize("path", ["/login", "/", "/admin/audit", "/api/worklist", "/nope"])
def test_pages_get_a_strict_content_security_policy(client: TestClient, path: str) -> None:
    if path != "/login":
        login(client, "admin")
    csp = _directives(client.get(path).headers["Content-Security-Policy"])
    assert csp["default-src"] == "'self'"
    assert csp["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert csp["style-src"] == "'self'"
    assert csp["object-src"] == "'none'" and csp["base-uri"] == "'none'"
    assert csp["form-action"] == "'self'"


def test_pages_need_no_inline_script_or_style(client: TestClient, node: Node) -> None:
    """What the CSP above would block: an inline <script>, on* handlers, style attributes."""
    uid = add_study(node, study_description="<b>CHEST</b>")
    login(client, "admin")
    pages = [
        "/",
        "/worklist/rows",
        f"/studies/{uid}",
        "/models/pneumonia-triage/card",
        "/admin/rules",
        "/admin/destinations",
        "/admin/models",
        "/admin/status",
        "/admin/audit",
    ]
    for path in pages:
        r = client.get(path)
        assert r.status_code == 200, path
        assert not _INLINE_SCRIPT.search(r.text), (path, _INLINE_SCRIPT.findall(r.text))
        assert not _INLINE_HANDLER.search(r.text), path
        assert not _STYLE_ATTRIBUTE.search(r.text), path
    assert not _INLINE_SCRIPT.search(TestClient(client.app).get("/login").text)


def test_the_script_starts_each_pages_behaviour_itself(client: TestClient) -> None:
    """The pages no longer call TriageNode.* inline: app.js must wire them up on load."""
    js = client.get("/static/app.js").text
    for name in ("pollWorklist", "overlayToggles", "echoButtons", "hourBars"):
        assert re.search(rf"^\s*{name}\(\);", js, re.M), name


def test_https_only_when_the_node_serves_https(
    start_node: Callable[..., Node], client: TestClient
) -> None:
    """Secure cookies mean HTTPS (TLS here or at a proxy): browsers must not fall back
    to plain HTTP, where the session cookie would not be sent and a MITM could strip TLS."""
    assert "Strict-Transport-Security" not in client.get("/login").headers
    secure = start_node(web={"secure_cookies": True})
    with TestClient(create_app(secure), base_url="https://testserver") as c:
        r = c.get("/login")
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "; secure" in r.headers["set-cookie"].lower()
