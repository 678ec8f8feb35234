"""A model an admin disabled is not run: the study skips it and says so in its status.

The runner here fails the test if a model is used at all; what is under test is
the choice of models at the start of processing, against a real database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Finding, Study, StudyStatus
from node.model_switches import disabled_models, set_enabled, switches
from tests.conftest import node_config
from tests.unit.pipeline.studies import queued_study
from workers.processing import StudyProcessor


class UnusableRunner:
    """Stands where the models run; any use of a model is a test failure."""

    @property
    def classifier(self) -> Any:
        raise AssertionError("a model was run")

    segmenter = classifier


def _processor(tmp_path: Path, sessions: sessionmaker[Session]) -> StudyProcessor:
    settings = Settings.model_validate(node_config(tmp_path))
    return StudyProcessor(settings, sessions, UnusableRunner())  # type: ignore[arg-type]


def test_switches_record_who_and_when(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        assert disabled_models(session) == set()
        set_enabled(session, "lung-seg", False, "alice")
    with sessions.begin() as session:
        assert disabled_models(session) == {"lung-seg"}
        set_enabled(session, "lung-seg", True, "bob")
        set_enabled(session, "pneumonia-triage", False, "bob")
    with sessions() as session:
        state = switches(session)
        assert disabled_models(session) == {"pneumonia-triage"}
    assert state["lung-seg"].enabled and state["lung-seg"].changed_by == "bob"
    assert state["lung-seg"].changed_at is not None


def test_only_disabled_models_routed_the_study_is_done_with_a_reason(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    study_id = queued_study(sessions, "1.2.826.0.1.3680043.10.1234.78", ["pneumonia-triage"])
    with sessions.begin() as session:
        set_enabled(session, "pneumonia-triage", False, "admin")
    assert _processor(tmp_path, sessions).run(study_id, 1).state == "done"
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.status == StudyStatus.DONE
        assert study.status_reason == "not run, disabled by an admin: pneumonia-triage"
        assert study.key_score is None
        assert session.execute(select(func.count(Finding.id))).scalar_one() == 0


def test_a_disabled_model_is_dropped_and_the_others_run(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    study_id = queued_study(
        sessions, "1.2.826.0.1.3680043.10.1234.78", ["pneumonia-triage", "lung-seg"]
    )
    with sessions.begin() as session:
        set_enabled(session, "pneumonia-triage", False, "admin")
    processor = _processor(tmp_path, sessions)
    asked: list[list[str]] = []

    def select_frames(paths: list[Path], models: list[str]) -> tuple[list[Any], list[str]]:
        asked.append(models)
        return [], []

    processor._select_frames = select_frames  # type: ignore[method-assign]
    assert processor.run(study_id, 1).state == "done"
    assert asked == [["lung-seg"]]
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        assert (study.status_reason or "").startswith(
            "not run, disabled by an admin: pneumonia-triage; "
        )

    # Switched back on: the next run of the study uses both models again.
    with sessions.begin() as session:
        set_enabled(session, "pneumonia-triage", True, "admin")
        study = session.get(Study, study_id)
        assert study is not None
        study.status = StudyStatus.QUEUED
    assert processor.run(study_id, 1).state == "done"
    assert asked[-1] == ["pneumonia-triage", "lung-seg"]
