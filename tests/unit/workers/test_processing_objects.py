"""A processed study's result objects: several source series, storage faults, notes.

The models are stand-ins (fixed outputs); what is under test is how `StudyProcessor`
turns their results into SEG/SR/SC files and into the study's final state, against a
real database and real DICOM files read through a worker storage.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db.models import Export, ExportState, Finding, Study, StudyStatus
from node.db.types import utcnow
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

    def read_result(self, relative_path: str) -> bytes:
        if relative_path not in self.results:
            raise FileNotFoundError(relative_path)
        return self.results[relative_path]

    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage:
        return self


def _two_series_study(tmp_path: Path) -> list[tuple[InstanceRef, Path]]:
    """Two frontal CRs of one study, each in its own series, written as files."""
    first = synthetic_cr()
    second = copy.deepcopy(first)
    second.SeriesInstanceUID = generate_uid(entropy_srcs=["plate-2-series"])
    second.SOPInstanceUID = generate_uid(entropy_srcs=["plate-2"])
    return _files(tmp_path, first, second)


def _files(tmp_path: Path, *datasets: Dataset) -> list[tuple[InstanceRef, Path]]:
    out = []
    for ds in datasets:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ref = InstanceRef(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(path)
        )
        out.append((ref, path))
    return out


def _processor(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    skipped: list[str] | None = None,
    files: list[tuple[InstanceRef, Path]] | None = None,
) -> tuple[StudyProcessor, FileStorage, int]:
    files = files or _two_series_study(tmp_path)
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


def _selecting(processor: StudyProcessor, files: list[tuple[InstanceRef, Path]]) -> None:
    """The real frame selection, over `files` rather than the database's instance rows."""
    real = StudyProcessor._select_frames.__get__(processor)
    processor._select_frames = lambda refs, models: real([ref for ref, _ in files], models)  # type: ignore[method-assign]


def _unreadable_cr() -> Dataset:
    """A frontal chest CR of the same study whose pixel data is cut short."""
    ds = synthetic_cr()
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cut-short"])
    ds.PixelData = ds.PixelData[:100]
    return ds


def _blank_cr() -> Dataset:
    """A frontal chest CR of the same study with a flat field: a failed exposure.

    The shipped classifier calls the zeros a flat image normalises to pneumonia at 0.99:
    it must be left out like an unreadable image, never become a finding.
    """
    ds = synthetic_cr()
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["blank"])
    ds.set_pixel_data(
        np.full((300, 256), 2048, np.uint16), "MONOCHROME2", 12, generate_instance_uid=False
    )
    return ds


NOT_ANALYSABLE = pytest.mark.parametrize(
    ("make", "why"),
    [
        pytest.param(_unreadable_cr, "pixel data cannot be decoded", id="cut-short"),
        pytest.param(_blank_cr, "no usable contrast (blank or failed exposure", id="blank"),
    ],
)


def _analysed(sessions: sessionmaker[Session], study_id: int) -> list[str | None]:
    with sessions() as session:
        query = select(Finding.sop_instance_uid).where(Finding.study_id == study_id)
        return list(session.scalars(query).all())


@NOT_ANALYSABLE
def test_an_unreadable_image_is_left_out_and_the_others_analysed(
    tmp_path: Path, sessions: sessionmaker[Session], make: Callable[[], Dataset], why: str
) -> None:
    broken = make()
    files = _files(tmp_path, synthetic_cr(), broken)
    processor, storage, study_id = _processor(tmp_path, sessions, files=files)
    _selecting(processor, files)
    assert processor.run(study_id, 1).state == "done"
    study = _study(sessions, study_id)
    assert study.status == StudyStatus.DONE and study.key_finding == "pneumonia"
    reason = study.status_reason or ""
    assert reason.startswith(f"1 unreadable image(s) not analysed: {broken.SOPInstanceUID}: ")
    assert why in reason
    assert broken.SOPInstanceUID not in _analysed(sessions, study_id)
    assert _kinds(storage) == ["sc", "seg", "sr"]


@NOT_ANALYSABLE
def test_a_study_with_no_readable_image_fails_at_once(
    tmp_path: Path, sessions: sessionmaker[Session], make: Callable[[], Dataset], why: str
) -> None:
    files = _files(tmp_path, make())
    processor, storage, study_id = _processor(tmp_path, sessions, files=files)
    _selecting(processor, files)
    outcome = processor.run(study_id, 1)
    assert outcome.state == "failed" and why in (outcome.reason or "")
    study = _study(sessions, study_id)
    assert study.status == StudyStatus.FAILED and study.attempts == 1
    # No finding, so never escalated: a detector fault is not "urgent pneumonia".
    assert study.key_finding is None and study.key_score is None
    assert study.priority == study.base_priority and _analysed(sessions, study_id) == []
    assert _kinds(storage) == []


def _area_items(storage: FileStorage) -> list[Dataset]:
    """The SR's lung area NUM content items (SCT 42798000 Area)."""
    (sr_path,) = [p for p in storage.results if p.endswith(".dcm") and p.split("/")[-2] == "sr"]
    sr = dcmread(BytesIO(storage.results[sr_path]))
    found: list[Dataset] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "NUM" and name and name[0].CodeValue == "42798000":
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def _methods(item: Dataset) -> list[str]:
    """Code values of the Measurement Method (SCT 370129005) modifiers of a NUM item."""
    return [
        child.ConceptCodeSequence[0].CodeValue
        for child in item.get("ContentSequence", [])
        if child.ConceptNameCodeSequence[0].CodeValue == "370129005"
    ]


@pytest.mark.parametrize(
    ("attributes", "spacing", "methods"),
    [
        ({}, 0.2, ["DETPLANE"]),
        ({"EstimatedRadiographicMagnificationFactor": 1.25}, 0.16, []),
        ({"PixelSpacing": [0.2, 0.2]}, 0.2, ["DETPLANE"]),  # equal: not calibrated
        ({"PixelSpacing": [0.17, 0.17]}, 0.17, []),  # calibrated
    ],
    ids=["imager", "ermf", "equal-pixel-spacing", "calibrated"],
)
def test_lung_area_is_in_the_patient_plane_or_says_it_is_not(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    attributes: dict[str, object],
    spacing: float,
    methods: list[str],
) -> None:
    """Imager Pixel Spacing / ERMF gives the area in the patient; without ERMF (or a
    calibrated Pixel Spacing) the SR area carries Measurement Method 'detector plane'."""
    ds = synthetic_cr()
    ds.ImagerPixelSpacing = [0.2, 0.2]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    files = _files(tmp_path, ds)
    processor, storage, study_id = _processor(tmp_path, sessions, files=files)
    _selecting(processor, files)
    assert processor.run(study_id, 1).state == "done"
    with sessions() as session:
        (lung,) = session.execute(
            select(Finding).where(Finding.study_id == study_id, Finding.kind == "segmentation")
        ).scalars()
    assert lung.lung_area_px and lung.lung_area_mm2 == pytest.approx(
        lung.lung_area_px * spacing * spacing
    )
    (area,) = _area_items(storage)
    assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(lung.lung_area_mm2)
    assert _methods(area) == methods


def _sr_sent(
    sessions: sessionmaker[Session], study_id: int, storage: FileStorage, version: int
) -> str:
    """Record the version's SR as exported to a PACS (what the worker's _finish enqueues)."""
    (path,) = [p for p in storage.results if p.endswith(".dcm") and p.split("/")[-2] == "sr"]
    sr = dcmread(BytesIO(storage.results[path]))
    now = utcnow()
    with sessions.begin() as session:
        session.add(
            Export(
                study_id=study_id,
                study_version=version,
                destination="PACS",
                kind="sr",
                sop_instance_uid=str(sr.SOPInstanceUID),
                sop_class_uid=str(sr.SOPClassUID),
                path=path,
                state=ExportState.DELIVERED,
                attempts=1,
                created_at=now,
                retry_started_at=now,
                delivered_at=now,
            )
        )
    return str(sr.SOPInstanceUID)


def _requeue(sessions: sessionmaker[Session], study_id: int, version: int) -> None:
    with sessions.begin() as session:
        study = session.get(Study, study_id)
        assert study is not None
        study.version, study.status = version, StudyStatus.QUEUED


def test_a_later_versions_report_names_the_report_pacs_already_has(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """A study that gains an image gets a report with a new UID; the one PACS holds from
    v1 is listed as its predecessor, so a reader sees which report is current."""
    files = _two_series_study(tmp_path)
    processor, storage, study_id = _processor(tmp_path, sessions, files=files[:1])
    assert processor.run(study_id, 1).state == "done"
    v1_uid = _sr_sent(sessions, study_id, storage, 1)

    processor._select_frames = lambda refs, models: (  # type: ignore[method-assign]
        [_FrameResult(f, ref) for ref, path in files for f in read_frames(path)],
        [],
    )
    _requeue(sessions, study_id, 2)
    assert processor.run(study_id, 2).state == "done"
    (v2_path,) = [p for p in storage.results if "/v2/sr/" in p]
    v2 = dcmread(BytesIO(storage.results[v2_path]))
    assert str(v2.SOPInstanceUID) != v1_uid
    referenced = [
        item.ReferencedSOPInstanceUID
        for study in v2.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert referenced == [v1_uid]


def test_a_previous_report_that_is_gone_leaves_the_new_one_standing_alone(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    files = _two_series_study(tmp_path)
    processor, storage, study_id = _processor(tmp_path, sessions, files=files[:1])
    assert processor.run(study_id, 1).state == "done"
    _sr_sent(sessions, study_id, storage, 1)
    storage.results.clear()  # retention purged v1's results

    _requeue(sessions, study_id, 2)
    assert processor.run(study_id, 2).state == "done"
    (v2_path,) = [p for p in storage.results if "/v2/sr/" in p]
    assert "PredecessorDocumentsSequence" not in dcmread(BytesIO(storage.results[v2_path]))


class _TakesAll:
    """A model selector that takes every image (the chest models take no multi-frame)."""

    def why_not(self, header: Dataset) -> None:
        return None


def test_a_blank_frame_of_a_multi_frame_image_is_named_on_the_study(
    tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other frames are analysed; the radiologist is told which frame was not, and why."""
    monkeypatch.setattr(processing, "selector_for", lambda model: _TakesAll())
    ds = synthetic_cr()
    good = ds.pixel_array
    stack = np.stack([good, np.full_like(good, 2048), good])
    ds.set_pixel_data(stack, "MONOCHROME2", 12, generate_instance_uid=False)
    files = _files(tmp_path, ds)
    processor, _, study_id = _processor(tmp_path, sessions, files=files)
    _selecting(processor, files)
    assert processor.run(study_id, 1).state == "done"
    reason = _study(sessions, study_id).status_reason or ""
    assert reason.startswith(f"1 image(s) not analysed: {ds.SOPInstanceUID} frame 2: ")
    assert "no usable contrast" in reason
    with sessions() as session:
        frames = session.scalars(
            select(Finding.frame_number).where(
                Finding.study_id == study_id,
                Finding.kind == "classification",
                Finding.frame_number.is_not(None),
            )
        ).all()
    assert sorted(frames) == [1, 3]
