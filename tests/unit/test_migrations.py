"""Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import command
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


def _insert_study(engine: sa.Engine, **values: object) -> None:
    """A study row as the schema of the current revision has it."""
    studies = sa.Table("studies", sa.MetaData(), autoload_with=engine)
    received = datetime(2026, 11, 25, 8, 0)
    with engine.begin() as conn:
        conn.execute(
            studies.insert().values(
                modalities="CR",
                calling_ae_title="X",
                status="done",
                priority=0,
                version=1,
                series_count=0,
                instance_count=1,
                size_bytes=0,
                first_received_at=received,
                last_received_at=received,
                base_priority=0,
                attempts=0,
                **values,
            )
        )


def test_upgrade_gives_existing_studies_an_updated_at(database_url: str) -> None:
    """0008 adds a NOT NULL column to a table that already holds studies."""
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0007")
        _insert_study(engine, study_instance_uid="1.2.3")
        migrate.upgrade(engine)
        with engine.connect() as conn:
            updated = conn.execute(sa.text("SELECT updated_at FROM studies")).scalar_one()
        assert updated is not None
    finally:
        engine.dispose()


def test_upgrade_keeps_the_read_and_reviewed_marks_studies_have(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0009")
        at = datetime(2026, 11, 25, 9, 0)
        _insert_study(engine, study_instance_uid="1.2.3", read_by="rad", read_at=at, updated_at=at)
        _insert_study(
            engine,
            study_instance_uid="1.2.4",
            updated_at=at,
            read_by="rad",
            read_at=at,
            reviewed_by="admin",
            reviewed_at=at,
        )
        _insert_study(engine, study_instance_uid="1.2.5", updated_at=at)
        migrate.upgrade(engine)
        with engine.connect() as conn:
            marks = conn.execute(
                sa.text(
                    "SELECT s.study_instance_uid, m.mark, m.user_name, m.marked_at "
                    "FROM study_marks m JOIN studies s ON s.id = m.study_id "
                    "ORDER BY s.study_instance_uid, m.mark"
                )
            ).all()
        assert [tuple(m[:3]) for m in marks] == [
            ("1.2.3", "read", "rad"),
            ("1.2.4", "read", "rad"),
            ("1.2.4", "reviewed", "admin"),
        ]
        assert all(str(m.marked_at).startswith("2026-11-25 09:00") for m in marks)
    finally:
        engine.dispose()


def test_downgrade_to_0008_and_upgrade_again(database_url: str) -> None:
    """Tables added after 0008 go with a downgrade and come back with the upgrade."""
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine)
        cfg = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0008")
        assert migrate.current_revision(engine) == "0008"
        later = {"web_sessions", "study_marks"}
        assert not later & set(sa.inspect(engine).get_table_names())
        migrate.upgrade(engine)
        assert migrate.is_up_to_date(engine)
        assert later <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
