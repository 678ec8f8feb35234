"""A migrated database on each backend for the rules store and study attributes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url, durable=False)
    migrate.upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()
