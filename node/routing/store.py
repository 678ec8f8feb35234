"""Versions of the rules document in the ``rule_sets`` table.

Every save adds a version; exactly one version is active. Versions are never
changed or deleted, so the table is the history of who changed what and when.
Rollback (:meth:`RuleStore.activate`) copies the old text as a *new* version: the
table has no "activated by" column, and a copy records who rolled back, when and
to what (in ``comment``) with no second kind of history event. A text is parsed
before anything is written: a document with a mistake changes nothing and the
running rules stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import RuleSet as RuleSetRow
from node.db.types import utcnow
from node.errors import RuleError, RuleSetNotFound
from node.routing.rules import KNOWN_MODELS, RuleSet, parse_rules

log = logging.getLogger(__name__)

#: Rules used when no file is configured: chest CR/DX -> both models, routine.
DEFAULT_RULES = "default_rules.toml"
#: ``created_by`` of the version imported at first start.
SEED_AUTHOR = "system"
#: Why a document without an enabled rule is not saved.
NOTHING_ROUTED = "no enabled rule: every study would be recorded as not routed"
_SAVE_ATTEMPTS = 10  # a save loses at most once per concurrent save that wins


@dataclass(frozen=True, slots=True)
class RuleSetVersion:
    """One saved version, for listings (the text itself: :meth:`RuleStore.text`)."""

    version: int
    created_at: datetime
    created_by: str
    comment: str | None
    active: bool
    sha256: str


def default_rules_text() -> str:
    return resources.files("node.routing").joinpath(DEFAULT_RULES).read_text(encoding="utf-8")


def seed_text(rules_file: Path | None) -> tuple[str, str]:
    """The text :meth:`RuleStore.ensure_seeded` would import, and where it is from."""
    if rules_file is None:
        return default_rules_text(), f"packaged {DEFAULT_RULES}"
    try:
        return rules_file.read_text(encoding="utf-8"), str(rules_file)
    except OSError as exc:
        raise RuleError(str(rules_file), [f"cannot read file: {exc.strerror}"]) from None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RuleStore:
    """Save, list, activate and read versions of the routing rules."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        known_models: Collection[str] = KNOWN_MODELS,
        known_destinations: Collection[str] | None = None,
    ) -> None:
        self._sessions = sessions
        self._known_models = known_models
        self._known_destinations = known_destinations
        self._parsed: dict[int, RuleSet] = {}  # versions never change: safe to keep

    def parse(self, text: str, source: str = "<rules>") -> RuleSet:
        """Validate ``text`` as this store would before saving it."""
        return parse_rules(
            text,
            source,
            known_models=self._known_models,
            known_destinations=self._known_destinations,
        )

    def _parse_to_save(self, text: str, source: str) -> RuleSet:
        """:meth:`parse`, and refuse rules that route nothing.

        A document without an enabled rule is valid to check or test, but made
        active it would record every new study as not routed.
        """
        rule_set = self.parse(text, source)
        if not any(rule.enabled for rule in rule_set.rules):
            raise RuleError(source, [NOTHING_ROUTED])
        return rule_set

    # -- reading -----------------------------------------------------------------------
    def active_version(self) -> int | None:
        with self._sessions() as session:
            return session.scalar(select(RuleSetRow.version).where(RuleSetRow.active))

    def active(self) -> tuple[int, RuleSet]:
        """The active version and its rules.

        Raises :class:`RuleSetNotFound` when no version exists yet, and
        :class:`RuleError` when the stored text no longer validates (a model it
        names was removed from this node).
        """
        with self._sessions() as session:
            row = session.execute(
                select(RuleSetRow.version, RuleSetRow.content).where(RuleSetRow.active)
            ).first()
        if row is None:
            raise RuleSetNotFound("rule_sets", ["no rules version is active; import one"])
        version, content = row
        if version not in self._parsed:
            self._parsed[version] = self.parse(content, f"rules version {version}")
        return version, self._parsed[version]

    def text(self, version: int) -> str:
        with self._sessions() as session:
            content = session.scalar(
                select(RuleSetRow.content).where(RuleSetRow.version == version)
            )
        if content is None:
            raise RuleSetNotFound(f"rules version {version}", ["no such version"])
        return content

    def versions(self) -> list[RuleSetVersion]:
        """Every version, newest first."""
        with self._sessions() as session:
            rows = session.scalars(select(RuleSetRow).order_by(RuleSetRow.version.desc())).all()
            return [
                RuleSetVersion(
                    version=r.version,
                    created_at=r.created_at,
                    created_by=r.created_by,
                    comment=r.comment,
                    active=r.active,
                    sha256=r.sha256,
                )
                for r in rows
            ]

    # -- writing -----------------------------------------------------------------------
    def save(self, text: str, created_by: str, comment: str | None = None) -> int:
        """Validate ``text`` and store it as the new active version; returns its number.

        On :class:`RuleError` (a mistake, or no enabled rule) nothing is written.
        Concurrent saves are serialised by the unique version number: the loser of a
        race retries with the next one.
        """
        self._parse_to_save(text, "new rules version")
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                return self._insert(text, created_by, comment, version=None)
            except IntegrityError:
                if attempt == _SAVE_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def activate(self, version: int, by: str) -> int:
        """Roll back (or forward) to ``version``: its text becomes a new active version.

        Returns the new version number; if ``version`` is already active, nothing is
        written and it is returned. The old text is validated again first (the
        models it names must still exist).
        """
        current = self.active_version()
        if current == version:
            return version
        text = self.text(version)
        return self.save(text, by, comment=f"rollback to version {version}")

    def ensure_seeded(self, rules_file: Path | None) -> int:
        """If no version exists, import ``rules_file`` (or the packaged default) as version 1.

        Returns the active version. Several processes starting at once are fine:
        one inserts version 1, the others find it. A file with a mistake raises
        :class:`RuleError` and nothing is written.
        """
        current = self.active_version()
        if current is not None:
            self._check_active(current)
            return current
        text, source = seed_text(rules_file)
        self._parse_to_save(text, source)
        with contextlib.suppress(IntegrityError):  # another process seeded first
            self._insert(text, SEED_AUTHOR, f"imported from {source}", version=1)
        current = self.active_version()
        if current is None:
            raise RuleSetNotFound("rule_sets", ["versions exist but none is active"])
        return current

    def _check_active(self, version: int) -> None:
        """Say at start, not first at routing time, that the stored rules no longer fit.

        A version saved earlier can stop validating when this node's configuration
        changed (a destination or model it names was removed). The node still starts:
        ingest must go on. Complete studies wait, with the reason shown on each, until
        an admin saves rules that validate.
        """
        try:
            self.active()
        except RuleError as exc:
            log.error(
                "active rules version %d no longer validates; routing waits for valid rules: %s",
                version,
                exc,
            )

    def _insert(self, text: str, created_by: str, comment: str | None, version: int | None) -> int:
        # Order matters under READ COMMITTED: read the number, then deactivate, then
        # insert. A concurrent save that committed in between makes the insert fail on
        # the unique version (and roll back the deactivation), never leaves two active.
        with self._sessions.begin() as session:
            if version is None:
                version = (session.scalar(select(func.max(RuleSetRow.version))) or 0) + 1
            session.execute(update(RuleSetRow).where(RuleSetRow.active).values(active=False))
            session.add(
                RuleSetRow(
                    version=version,
                    content=text,
                    sha256=_sha256(text),
                    created_at=utcnow(),
                    created_by=created_by[:64],
                    comment=comment,
                    active=True,
                )
            )
            session.flush()
        log.info("rules version %d active (by %s)", version, created_by[:64])
        return version
