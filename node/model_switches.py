"""Which models an admin has switched off, and switching them on and off.

The routing rules say which models a study *should* run; this table says which
models may run at all. Workers read it at the start of every study, so a switch
takes effect on the next study without restarting anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import ModelSetting
from node.db.types import utcnow


@dataclass(frozen=True, slots=True)
class ModelSwitch:
    name: str
    enabled: bool
    changed_by: str | None = None
    changed_at: datetime | None = None


def disabled_models(session: Session) -> set[str]:
    """Names of the models an admin disabled."""
    return set(
        session.execute(select(ModelSetting.name).where(ModelSetting.enabled.is_(False))).scalars()
    )


def switches(session: Session) -> dict[str, ModelSwitch]:
    """Every model someone switched, by name (models without a row are enabled)."""
    return {
        s.name: ModelSwitch(s.name, s.enabled, s.changed_by, s.changed_at)
        for s in session.execute(select(ModelSetting)).scalars()
    }


def set_enabled(session: Session, name: str, enabled: bool, user_name: str) -> ModelSwitch:
    """Switch ``name`` on or off as ``user_name``; returns the new state.

    The row is locked (or created under the primary key), so two admins switching
    at once leave the last one's choice, never two rows.
    """
    now = utcnow()
    row = session.execute(
        select(ModelSetting).where(ModelSetting.name == name).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        row = ModelSetting(name=name)
        session.add(row)
    row.enabled, row.changed_by, row.changed_at = enabled, user_name[:64], now
    session.flush()
    return ModelSwitch(name, enabled, row.changed_by, now)
