"""Fixtures shared by all tests: data, databases (SQLite and PostgreSQL), nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings, load_settings
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.runtime import Node
from tests.nodes import SHARED_DATA, free_port, postgres_database
from tests.peers import Orthanc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"test data not found at {SHARED_DATA} (../shared/data)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_corpus(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom").rglob("*.dcm"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database on each backend the node supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated, empty database (each backend, like ``database_url``)."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def node_config(tmp_path: Path, database_url: str | None = None, **sections: Any) -> dict[str, Any]:
    """A complete config document for a test node on free ports under ``tmp_path``."""
    cfg: dict[str, Any] = {
        "dicom": {"port": free_port(), "host": "127.0.0.1"},
        "storage": {"data_dir": str(tmp_path / "var"), "min_free_bytes": 0},
        "study": {"quiet_seconds": 3600},
        "web": {"enabled": False, "port": free_port()},
        "pipeline": {"workers": 0},
    }
    if database_url:
        cfg["database"] = {"url": database_url}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes: ``start_node(database_url=None, **sections)``."""
    started: list[Node] = []

    def _start(database_url: str | None = None, **sections: Any) -> Node:
        settings = Settings.model_validate(node_config(tmp_path, database_url, **sections))
        node = Node(settings)
        node.start()
        started.append(node)
        return node

    yield _start
    for node in reversed(started):
        node.stop()


@pytest.fixture
def example_config() -> Path:
    path = Path(__file__).resolve().parents[1] / "config.example.toml"
    load_settings(path)
    return path


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc on free ports: the PACS that receives results."""
    pacs = Orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port()).start()
    yield pacs
    pacs.stop()
