"""The audit trail: who looked at which study, and who changed what, when, from where.

Every page and API call that shows patient data records one event; so does every
change to a study (read, reviewed) or to the node (rules, users). Events carry the
user name, the StudyInstanceUID and a short detail without patient data.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.matching import holds_item
from node.db.models import AuditEvent
from node.db.types import utcnow


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    time: datetime
    user_name: str
    action: str
    study_instance_uid: str | None
    detail: str | None
    client_address: str | None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters; ``since`` and ``until`` without a time zone are UTC, as on the audit page."""

    user_name: str | None = None
    action: str | None = None
    study_instance_uid: str | None = None
    since: datetime | None = None
    until: datetime | None = None


#: The most StudyInstanceUIDs one event lists: the largest page the worklist serves
#: (API ``limit`` and ``web.page_size`` stop at 500), some 33 kB of detail at most.
MAX_LISTED_UIDS = 500


def listing(filters: str, uids: Sequence[str]) -> str:
    """The detail of a worklist event: its filters, then the studies shown, in page order.

    A list of studies is a view of patient data like a study page: the trail must say
    which studies a user saw, not only how they searched.
    """
    shown = " ".join(uids[:MAX_LISTED_UIDS])
    more = len(uids) - MAX_LISTED_UIDS
    parts = [filters, f"shown {len(uids)}" + (f": {shown}" if shown else "")]
    if more > 0:
        parts.append(f"(+{more} more)")
    return " ".join(p for p in parts if p)


def _storable(text: str) -> str:
    """``text`` with NUL shown as U+FFFD: PostgreSQL text cannot hold NUL, and a name
    tried at a failed login (anyone's text) must still be recorded, not fail the login."""
    return text.replace("\x00", "\ufffd")


class AuditTrail:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def record(
        self,
        user_name: str,
        action: str,
        *,
        study_instance_uid: str | None = None,
        detail: str | None = None,
        client_address: str | None = None,
    ) -> None:
        with self._sessions.begin() as session:
            session.add(
                AuditEvent(
                    time=utcnow(),
                    user_name=_storable(user_name)[:64],
                    action=action[:64],
                    study_instance_uid=study_instance_uid,
                    detail=None if detail is None else _storable(detail),
                    client_address=(client_address or "")[:64] or None,
                )
            )

    def list(self, query: AuditQuery, *, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        """Newest first."""
        with self._sessions() as session:
            stmt = _filtered(query).limit(limit).offset(offset)
            return [_record(e) for e in session.scalars(stmt)]

    def all(self, query: AuditQuery) -> Iterator[AuditRecord]:
        """Every matching event, newest first, read in batches (for the CSV export)."""
        with self._sessions() as session:
            stmt = _filtered(query).execution_options(yield_per=1000)
            for event in session.scalars(stmt):
                yield _record(event)


def _filtered(query: AuditQuery) -> Select[AuditEvent]:
    stmt = select(AuditEvent)
    if query.user_name:
        stmt = stmt.where(AuditEvent.user_name == query.user_name)
    if query.action:
        stmt = stmt.where(AuditEvent.action == query.action)
    if query.study_instance_uid:
        stmt = stmt.where(_concerns(query.study_instance_uid))
    if query.since:
        stmt = stmt.where(AuditEvent.time >= utc(query.since))
    if query.until:
        stmt = stmt.where(AuditEvent.time < utc(query.until))
    return stmt.order_by(AuditEvent.id.desc())


#: Events that list the studies shown in their detail (:func:`listing`), not in the
#: StudyInstanceUID column: a filter by study must find them too ("who saw study X").
LISTING_ACTIONS = ("worklist.view", "worklist.refresh", "worklist.api")


def _concerns(study_instance_uid: str) -> ColumnElement[bool]:
    """Events about one study: its own column, or a worklist listing that showed it
    (the UID as a whole word of the listing, so 1.2.3 does not find 1.2.34)."""
    return or_(
        AuditEvent.study_instance_uid == study_instance_uid,
        and_(
            AuditEvent.action.in_(LISTING_ACTIONS),
            holds_item(AuditEvent.detail, study_instance_uid, " "),
        ),
    )


def utc(time: datetime) -> datetime:
    """A time from a form or URL: without a time zone it is UTC (the column needs aware times)."""
    return time.replace(tzinfo=UTC) if time.tzinfo is None else time


def _record(e: AuditEvent) -> AuditRecord:
    return AuditRecord(
        e.id, e.time, e.user_name, e.action, e.study_instance_uid, e.detail, e.client_address
    )


CSV_HEADER = ("time", "user", "action", "StudyInstanceUID", "detail", "client_address")
#: A spreadsheet reads a cell starting with one of these as a formula (OWASP CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: A ';' before one of them (spaces or quotes between): where ';' is the list separator
#: (Excel in de, fr, nl, ... locales) the spreadsheet starts a new cell there, and the
#: csv module does not quote a cell for a ';'.
_FORMULA_AFTER_SEMICOLON = re.compile(r";(?=[ \"]*[=+\-@\t\r])")


def _defused(cell: str) -> str:
    """``cell`` with a ``'`` before every place a spreadsheet could start a formula."""
    cell = _FORMULA_AFTER_SEMICOLON.sub(";'", cell)
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def csv_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    """The audit trail as CSV text, one chunk per line (for a streaming response).

    Cells are text the admin opens in a spreadsheet, and some come from anyone (the
    name tried at a failed login): a cell that would start a formula gets a ``'`` first,
    and so does every part after a ``;`` that would.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for r in records:
        cells = (
            r.time.isoformat(),
            r.user_name,
            r.action,
            r.study_instance_uid or "",
            r.detail or "",
            r.client_address or "",
        )
        writer.writerow([_defused(c) for c in cells])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()
