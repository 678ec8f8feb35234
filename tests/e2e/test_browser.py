"""The web application in a real browser, against a whole node with a real worker.

Debian's Chromium (``/usr/bin/chromium``, never a downloaded browser) driven by
Playwright: log in, read the worklist in triage order, watch a STAT study arrive
without reloading, open a processed study and toggle its overlays, and edit the
routing rules (a mistake is shown with its line, a valid document is saved).
Screenshots of the worklist and the study page go to ``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import select

from node.config import load_settings
from node.db.models import Role, Study
from node.runtime import Node
from node.users.accounts import Accounts
from tests.conftest import node_config
from tests.dicomgen import cxr_from_jpeg
from tests.nodes import SHARED_DATA, wait_done, write_config
from tests.peers import storescu

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
RULES = Path(__file__).resolve().parents[1] / "integration" / "data" / "pipeline_rules.toml"
CALLERS = ["STORESCU@127.0.0.1", "ERSCU@127.0.0.1"]
ADMIN, PASSWORD = "admin", "a-long-password"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def node(folder: Path) -> Iterator[Node]:
    """A node with one real worker, the web app on a free port, and two processed CXRs.

    The normal CXR (E2E0) arrives before the pneumonia one (E2E1): triage order is not
    arrival order.
    """
    cfg = node_config(
        folder,
        dicom={"allowed_callers": CALLERS},
        study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
        routing={"rules_file": str(RULES)},
        pipeline={"workers": 1, "lease_seconds": 60},
        web={"enabled": True, "poll_seconds": 0.5},
    )
    path = write_config(folder / "node.toml", cfg)
    n = Node(load_settings(path), config_path=path)
    n.start()
    try:
        Accounts(n.sessions).add(ADMIN, PASSWORD, Role.ADMIN)
        val = SHARED_DATA / "cxr-pneumonia" / "val"
        jpegs = [sorted((val / kind).glob("*.jpeg"))[0] for kind in ("NORMAL", "PNEUMONIA")]
        files = [folder / f"cxr{i}.dcm" for i in range(len(jpegs))]
        uids = [
            cxr_from_jpeg(jpeg, out, accession=f"E2E{i}")[0]
            for i, (jpeg, out) in enumerate(zip(jpegs, files, strict=True))
        ]
        assert storescu(n.dicom.port, files).returncode == 0
        for uid in uids:
            wait_done(n, uid)
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium; Playwright gives each launch a fresh, temporary user-data-dir."""
    if not CHROMIUM.is_file():
        pytest.fail("Chromium not found: apt-get install chromium (scripts/test.sh does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, node: Node) -> Iterator[Page]:
    context = browser.new_context(base_url=node.web_url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    p = context.new_page()
    yield p
    context.close()


def log_in(page: Page) -> None:
    page.goto("/")
    assert "/login?next=" in page.url  # not logged in: sent to the form
    page.get_by_label("User name").fill(ADMIN)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#worklist")).to_be_visible()


def worklist_uids(page: Page) -> list[str]:
    return [
        uid
        for uid in page.locator("#worklist-rows tr").evaluate_all(
            "rows => rows.map(r => r.dataset.uid)"
        )
        if uid
    ]


def test_log_in_and_see_the_worklist_in_triage_order(page: Page, node: Node) -> None:
    page.goto("/login")
    page.get_by_label("User name").fill(ADMIN)
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("Wrong user name or password")
    log_in(page)
    expect(page.locator(".who")).to_contain_text("admin (admin)")

    with node.sessions() as session:
        studies = session.execute(select(Study)).scalars().all()
    expected = [
        s.study_instance_uid
        for s in sorted(
            studies,
            key=lambda s: (-s.priority, -(s.key_score if s.key_score is not None else -1.0)),
        )
    ]
    assert len(expected) == 2 and worklist_uids(page) == expected
    expect(page.locator("#worklist-rows tr").first).to_contain_text("E2E1")  # pneumonia first
    first = page.locator("#worklist-rows tr").first
    expect(first.locator(".flag")).to_contain_text("%")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)


def test_a_stat_study_appears_without_a_reload(page: Page, node: Node, folder: Path) -> None:
    log_in(page)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.evaluate("window.__notReloaded = true")

    jpeg = sorted((SHARED_DATA / "cxr-pneumonia" / "val" / "NORMAL").glob("*.jpeg"))[1]
    stat_uid, _ = cxr_from_jpeg(jpeg, folder / "stat.dcm", accession="STAT01")
    assert storescu(node.dicom.port, [folder / "stat.dcm"], aet="ERSCU").returncode == 0

    row = page.locator(f'#worklist-rows tr[data-uid="{stat_uid}"]')
    expect(row).to_have_class("prio-stat", timeout=30_000)
    expect(row.locator(".prio")).to_have_text("STAT")
    assert worklist_uids(page)[0] == stat_uid  # STAT goes to the top
    assert page.evaluate("window.__notReloaded") is True and navigations == []


def test_open_a_study_and_toggle_the_overlays(page: Page, node: Node) -> None:
    log_in(page)
    with node.sessions() as session:
        study = session.execute(select(Study).where(Study.accession_number == "E2E1")).scalar_one()
    page.locator(f'#worklist-rows tr[data-uid="{study.study_instance_uid}"] a').click()
    expect(page.locator("h2", has_text="Findings")).to_be_visible()
    expect(page.locator("table.findings")).to_contain_text("pneumonia-triage")
    expect(page.locator("table.findings")).to_contain_text("lung-seg")

    base = page.locator("img.base").first
    mask = page.locator("img.overlay.mask").first
    heatmap = page.locator("img.overlay.heatmap").first
    base.scroll_into_view_if_needed()
    expect(base).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=base.element_handle())
    expect(mask).to_be_hidden()
    expect(heatmap).to_be_hidden()

    page.locator("#toggle-mask").check()
    expect(mask).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=mask.element_handle())
    page.locator("#toggle-heatmap").check()
    expect(heatmap).to_be_visible()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle()
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)

    page.locator("#toggle-mask").uncheck()
    expect(mask).to_be_hidden()
    expect(heatmap).to_be_visible()


MISTAKE = """format = 1

[[rule]]
name = "chest"
priority = "routine"
models = ["no-such-model"]
destinations = []
[rule.match]
Modality = ["CR"]
"""


def test_edit_a_rule_see_the_mistake_then_save(page: Page, node: Node) -> None:
    log_in(page)
    page.goto("/admin/rules")
    original = page.locator("#rules-text").input_value()
    assert "emergency-chest" in original

    page.locator("#rules-text").fill(MISTAKE)
    page.locator("#rules-save").click()
    problems = page.locator("#rules-problems")
    expect(problems).to_contain_text("line 6")
    expect(problems).to_contain_text("no-such-model")
    expect(page.locator("#L6")).to_have_class("bad")
    assert page.locator("#rules-text").input_value() == MISTAKE  # the text is kept to fix
    assert node.rules.active_version() == 1  # nothing saved

    fixed = original.replace('description = "Chest radiographs"', 'description = "All chest"')
    assert fixed != original
    page.locator("#rules-text").fill(fixed)
    page.get_by_label("Comment").fill("browser test")
    page.locator("#rules-save").click()
    expect(page.locator("#rules-message")).to_contain_text("Saved as version 2")
    expect(page.locator("table.versions")).to_contain_text("browser test")
    assert node.rules.active_version() == 2
