"""Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from node.db import migrate
from node.db.engine import make_engine
from node.db.models import Base


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert not migrate.is_up_to_date(engine)
        migrate.upgrade(engine)
        assert migrate.is_up_to_date(engine)
        migrate.upgrade(engine)  # idempotent
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()
