"""Rules versions in the database (SQLite and PostgreSQL): save, refuse, roll back, seed."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import RuleSet as RuleSetRow
from node.errors import RuleError, RuleSetNotFound
from node.routing.store import SEED_AUTHOR, RuleStore, default_rules_text

V1 = """\
format = 1
[[rule]]
name = "chest"
priority = "routine"
models = ["pneumonia-triage", "lung-seg"]
[rule.match]
Modality = ["CR", "DX"]
"""
V2 = V1.replace('priority = "routine"', 'priority = "urgent"')
BROKEN = V1.replace("Modality", "Modalty")


def _rows(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(RuleSetRow)) or 0)


def test_save_makes_a_new_active_version(sessions: sessionmaker[Session]) -> None:
    store = RuleStore(sessions)
    with pytest.raises(RuleSetNotFound):
        store.active()
    assert store.save(V1, "alice", "first") == 1
    assert store.save(V2, "bob") == 2
    version, rules = store.active()
    assert version == 2
    assert rules.rules[0].priority == "urgent"
    listed = store.versions()
    assert [(v.version, v.created_by, v.comment, v.active) for v in listed] == [
        (2, "bob", None, True),
        (1, "alice", "first", False),
    ]
    assert listed[0].created_at >= listed[1].created_at
    assert listed[0].created_at.tzinfo is not None
    assert store.text(1) == V1


def test_a_broken_document_changes_nothing(sessions: sessionmaker[Session]) -> None:
    store = RuleStore(sessions)
    store.save(V1, "alice")
    with pytest.raises(RuleError) as caught:
        store.save(BROKEN, "mallory")
    assert "line 7: rule[0].match.Modalty: unknown DICOM keyword" in caught.value.problems[0]
    assert _rows(sessions) == 1
    assert store.active()[0] == 1


def test_rollback_copies_the_old_text_as_a_new_version(sessions: sessionmaker[Session]) -> None:
    store = RuleStore(sessions)
    store.save(V1, "alice")
    store.save(V2, "bob")
    assert store.activate(1, "carol") == 3
    version, rules = store.active()
    assert (version, rules.rules[0].priority) == (3, "routine")
    newest = store.versions()[0]
    assert (newest.created_by, newest.comment, newest.active) == (
        "carol",
        "rollback to version 1",
        True,
    )
    assert newest.sha256 == store.versions()[2].sha256
    assert sum(v.active for v in store.versions()) == 1
    # Activating the active version writes nothing.
    assert store.activate(3, "carol") == 3
    assert _rows(sessions) == 3
    with pytest.raises(RuleSetNotFound):
        store.activate(42, "carol")


def test_rollback_to_a_version_naming_a_removed_model_is_refused(
    sessions: sessionmaker[Session],
) -> None:
    RuleStore(sessions, known_models={"pneumonia-triage", "lung-seg", "old"}).save(
        V1.replace('"lung-seg"]', '"old"]'), "alice"
    )
    store = RuleStore(sessions)
    store.save(V1, "bob")
    with pytest.raises(RuleError, match="unknown model 'old'"):
        store.activate(1, "carol")
    assert store.active()[0] == 2


def test_seeding_imports_once(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(V2)
    store = RuleStore(sessions)
    assert store.ensure_seeded(rules_file) == 1
    assert store.ensure_seeded(None) == 1  # not empty any more: nothing imported
    (only,) = store.versions()
    assert only.created_by == SEED_AUTHOR and str(rules_file) in (only.comment or "")
    assert store.text(1) == V2


def test_seeding_defaults_to_the_packaged_rules(sessions: sessionmaker[Session]) -> None:
    store = RuleStore(sessions)
    assert store.ensure_seeded(None) == 1
    assert store.text(1) == default_rules_text()
    assert [r.name for r in store.active()[1].rules] == ["chest-xray"]


def test_seeding_a_broken_file_writes_nothing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN)
    store = RuleStore(sessions)
    with pytest.raises(RuleError) as caught:
        store.ensure_seeded(bad)
    assert caught.value.source == str(bad)
    with pytest.raises(RuleError, match="cannot read file"):
        store.ensure_seeded(tmp_path / "missing.toml")
    assert _rows(sessions) == 0


def test_start_with_stored_rules_that_no_longer_validate_says_so(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A destination the active rules name was removed from the configuration: the node
    still starts (ingest goes on) and says at once why routing waits."""
    with_pacs = V1.replace("[rule.match]", 'destinations = ["PACS"]\n[rule.match]')
    RuleStore(sessions, known_destinations={"PACS"}).save(with_pacs, "alice")
    store = RuleStore(sessions, known_destinations=set())
    with caplog.at_level(logging.ERROR, logger="node.routing.store"):
        assert store.ensure_seeded(None) == 1
    (record,) = caplog.records
    assert "no longer validates" in record.getMessage() and "PACS" in record.getMessage()
    with pytest.raises(RuleError):
        store.active()


def test_concurrent_saves_keep_one_active_version(sessions: sessionmaker[Session]) -> None:
    store = RuleStore(sessions)
    store.save(V1, "alice")
    errors: list[BaseException] = []

    def save(n: int) -> None:
        try:
            RuleStore(sessions).save(V2, f"admin{n}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = store.versions()
    assert sorted(v.version for v in versions) == list(range(1, 8))
    assert [v.version for v in versions if v.active] == [7]


@pytest.mark.parametrize(
    "text",
    ["format = 1\n", V1.replace("[rule.match]", "enabled = false\n[rule.match]")],
    ids=["no rules", "every rule disabled"],
)
def test_rules_that_route_nothing_are_not_saved(
    sessions: sessionmaker[Session], tmp_path: Path, text: str
) -> None:
    """Saved, such a document made every new study "not routed" until someone noticed."""
    store = RuleStore(sessions)
    store.save(V1, "alice")
    with pytest.raises(RuleError) as caught:
        store.save(text, "mallory")
    assert caught.value.problems == ["no enabled rule: every study would be recorded as not routed"]
    assert store.active()[0] == 1 and _rows(sessions) == 1

    seed = tmp_path / "rules.toml"
    seed.write_text(text)
    empty = RuleStore(sessions)
    with sessions.begin() as session:
        session.query(RuleSetRow).delete()
    with pytest.raises(RuleError, match="no enabled rule"):
        empty.ensure_seeded(seed)
    assert _rows(sessions) == 0
