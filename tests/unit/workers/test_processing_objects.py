"""A processed study's result objects: several source series, storage faults, notes.

The models are stand-ins (fixed outputs); what is under test is how `StudyProcessor`
turns their results into SEG/SR/SC files and into the study's final state, against a
real database and real DICOM files read through a worker storage.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Study, StudyStatus
from tests.conftest import node_config
from tests.unit.output.conftest import synthetic_cr, two_ellipses
from tests.unit.pipeline.studies import queued_study
from workers import processing
from workers.inference import Classification, Segmentation
from workers.output import OutputError
from workers.pixels import read_frames
from workers.processing import StudyProcessor, _FrameResult
from workers.storage import InstanceRef, StorageUnavailable, WorkerStorage

MODELS = ["pneumonia-triage", "lung-seg"]


class _Model:
    def __init__(self, name: str) -> None:
        self.name, self.version, self.threshold = name, "1.0.0", 0.5


class FixedRunner:
    """Stands where the models run: every image is 'pneumonia', both lungs segmented."""

    classifier = _Model("pneumonia-densenet")
    segmenter = _Model("lung-unet")

    def classify(self, images: Sequence[np.ndarray]) -> Classification:
        probabilities = np.array([[0.1, 0.9]] * len(images), dtype=np.float32)
        heatmaps = [np.full(i.shape, 0.5, dtype=np.float32) for i in images]
        return Classification(probabilities, heatmaps, 1.0)

    def segment(self, images: Sequence[np.ndarray]) -> Segmentation:
        return Segmentation([two_ellipses(*i.shape) for i in images], 1.0)


class FileStorage:
    """Instances from local files; results kept in memory; reads fail once `down` is set."""

    kind = "test"

    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}
        self.down = False

    @contextlib.contextmanager
    def instance(self, ref: InstanceRef) -> Iterator[Path]:
        if self.down:
            raise StorageUnavailable("GET instance: node unreachable (ConnectionError)")
        yield Path(ref.path)

    def write_result(self, relative_path: str, data: bytes) -> None:
        self.results[relative_path] = data

    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage:
        return self


def _two_series_study(tmp_path: Path) -> list[tuple[InstanceRef, Path]]:
    """Two frontal CRs of one study, each in its own series, written as files."""
    first = synthetic_cr()
    second = copy.deepcopy(first)
    second.SeriesInstanceUID = generate_uid(entropy_srcs=["plate-2-series"])
    second.SOPInstanceUID = generate_uid(entropy_srcs=["plate-2"])
    out = []
    for ds in (first, second):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ref = InstanceRef(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(path)
        )
        out.append((ref, path))
    return out


def _processor(
    tmp_path: Path, sessions: sessionmaker[Session], skipped: list[str] | None = None
) -> tuple[StudyProcessor, FileStorage, int]:
    files = _two_series_study(tmp_path)
    study_id = queued_study(sessions, files[0][0].study_uid, MODELS)
    settings = Settings.model_validate(
        node_config(tmp_path, pipeline={"max_attempts": 3, "retry_backoff_seconds": 10})
    )
    storage = FileStorage()
    processor = StudyProcessor(settings, sessions, FixedRunner(), storage)  # type: ignore[arg-type]

    def select_frames(
        refs: list[InstanceRef], models: list[str]
    ) -> tuple[list[_FrameResult], list[str]]:
        frames = [_FrameResult(f, ref) for ref, path in files for f in read_frames(path)]
        return frames, list(skipped or [])

    processor._select_frames = select_frames  # type: ignore[method-assign,assignment]
    return processor, storage, study_id


def _study(sessions: sessionmaker[Session], study_id: int) -> Study:
    with sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        session.expunge(study)
        return study


def _kinds(storage: FileStorage) -> list[str]:
    return sorted(p.split("/")[-2] for p in storage.results if p.endswith(".dcm"))


def test_study_over_two_series_gets_its_segs_report_and_heatmaps(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    processor, storage, study_id = _processor(tmp_path, sessions)
    assert processor.run(study_id, 1).state == "done"
    study = _study(sessions, study_id)
    assert study.status == StudyStatus.DONE and study.status_reason is None
    assert _kinds(storage) == ["sc", "sc", "seg", "seg", "sr"]


def test_storage_unreachable_while_building_objects_is_retried(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    processor, storage, study_id = _processor(tmp_path, sessions)
    real = processor._save

    def save_then_lose_the_node(*args: Any) -> str:
        path = real(*args)
        storage.down = True  # the node goes away after the models ran
        return path

    monkeypatch.setattr(processor, "_save", save_then_lose_the_node)
    outcome = processor.run(study_id, 1)
    assert outcome.state == "retry" and "StorageUnavailable" in (outcome.reason or "")
    study = _study(sessions, study_id)
    assert study.status == StudyStatus.QUEUED and study.attempts == 1
    assert "result objects could not be built" not in (study.status_reason or "")
    assert _kinds(storage) == []


def test_objects_that_cannot_be_built_keep_the_earlier_notes(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    processor, storage, study_id = _processor(
        tmp_path, sessions, skipped=["1.2.3: not a frontal chest image"]
    )

    def fail(*args: Any, **kwargs: Any) -> NoReturn:
        raise OutputError("source geometry refused")

    monkeypatch.setattr(processing, "build_objects", fail)
    assert processor.run(study_id, 1).state == "done"
    reason = _study(sessions, study_id).status_reason or ""
    assert reason.startswith("1 image(s) not analysed: 1.2.3: not a frontal chest image; ")
    assert "result objects could not be built: OutputError: source geometry refused" in reason
    assert _kinds(storage) == []
