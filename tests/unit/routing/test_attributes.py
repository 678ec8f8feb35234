"""What rules see of a stored study, and of a DICOM file: headers per series, sending AE."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.catalog import Catalog
from node.db.models import Study
from node.errors import StorageError
from node.ingest.inspect import inspect_instance
from node.routing.attributes import file_series_attributes, study_series_attributes
from node.routing.match import route
from node.routing.rules import parse_rules
from node.storage import InstanceStore
from tests.dicomgen import TEST_ROOT

PA_ONLY = """\
format = 1
[[rule]]
name = "chest-pa"
priority = "routine"
models = ["pneumonia-triage"]
[rule.match]
Modality = "CR"
ViewPosition = "PA"
CallingAETitle = "CR_*"
"""


def _store_instance(store: InstanceStore, catalog: Catalog, data: bytes, ae: str) -> int:
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    header = inspect_instance(
        data,
        requested_sop_class_uid=ds.SOPClassUID,
        requested_sop_instance_uid=ds.SOPInstanceUID,
    )
    rel = store.instance_relpath(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    return catalog.record_instance(header, store.write(rel, data), ae).study_id


def _copy(source: Path, *, new_series: bool = False, **changes: str) -> bytes:
    """Another image of the study (new SOP Instance UID, maybe in a new series)."""
    ds = pydicom.dcmread(source)
    if new_series:
        ds.SeriesInstanceUID = generate_uid(prefix=TEST_ROOT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=TEST_ROOT)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _lateral_copy(source: Path) -> bytes:
    """The same study with a second series: a lateral view under new UIDs."""
    return _copy(source, new_series=True, ViewPosition="LL")


def test_study_attributes_come_from_stored_headers(
    sessions: sessionmaker[Session], tmp_path: Path, shared_data: Path
) -> None:
    chest = shared_data / "dicom/modalities/cr/RG1_UNCR.dcm"
    store = InstanceStore(tmp_path / "var", fsync=False)
    catalog = Catalog(sessions)
    study_id = _store_instance(store, catalog, chest.read_bytes(), "CR_ROOM1")
    lateral = _lateral_copy(chest)
    assert _store_instance(store, catalog, lateral, "CR_ROOM1") == study_id

    with sessions() as session:
        series = study_series_attributes(session, store, study_id)
    pa, ll = series
    assert pa.series_instance_uid == "1.3.6.1.4.1.5962.1.3.9.1.20040826185059.5457"
    assert pa.get("Modality") == ("CR",)
    assert pa.get("BodyPartExamined") == ("CHEST",)
    assert pa.get("ViewPosition") == ("PA",)
    assert pa.get("ImageType") == ("DERIVED", "PRIMARY")
    assert pa.get("CallingAETitle") == ("CR_ROOM1",)
    assert pa.get("TransferSyntaxUID") is not None  # file meta is visible too
    assert pa.get("PixelData") is None  # headers only
    assert ll.get("ViewPosition") == ("LL",)

    decision = route(parse_rules(PA_ONLY), series)
    assert decision is not None
    assert decision.series_instance_uids == (pa.series_instance_uid,)


def test_an_unreadable_series_is_an_error_not_a_silent_skip(
    sessions: sessionmaker[Session], tmp_path: Path, shared_data: Path
) -> None:
    store = InstanceStore(tmp_path / "var", fsync=False)
    data = (shared_data / "dicom/modalities/cr/RG1_UNCR.dcm").read_bytes()
    study_id = _store_instance(store, Catalog(sessions), data, "CR_ROOM1")
    for path in (tmp_path / "var/instances").rglob("*.dcm"):
        path.write_bytes(b"not dicom")
    with sessions() as session, pytest.raises(StorageError, match="cannot read a header"):
        study_series_attributes(session, store, study_id)
    with sessions() as session:
        assert session.scalar(select(Study.id).where(Study.id == study_id)) == study_id


def test_file_and_folder_attributes(tmp_path: Path, shared_data: Path) -> None:
    cr = shared_data / "dicom/modalities/cr"
    (one,) = file_series_attributes(cr / "RG3_J2KR.dcm", "XR1")
    assert one.get("BodyPartExamined") == ("EXTREMITY",)
    assert one.get("CallingAETitle") == ("XR1",)
    (no_ae,) = file_series_attributes(cr / "RG3_J2KR.dcm")
    assert no_ae.get("CallingAETitle") == ()

    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "a.dcm").write_bytes((cr / "RG1_UNCR.dcm").read_bytes())
    (folder / "b.dcm").write_bytes(_lateral_copy(cr / "RG1_UNCR.dcm"))
    (folder / "notes.txt").write_text("not DICOM")
    assert [s.get("ViewPosition") for s in file_series_attributes(folder)] == [("PA",), ("LL",)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        file_series_attributes(empty)


def test_a_series_matches_when_any_of_its_images_does(
    sessions: sessionmaker[Session], tmp_path: Path, shared_data: Path
) -> None:
    """A lateral and a PA image in one series: the lateral arriving first did not
    make the study "not routed" (only the first image of a series was read)."""
    chest = shared_data / "dicom/modalities/cr/RG1_UNCR.dcm"
    store = InstanceStore(tmp_path / "var", fsync=False)
    catalog = Catalog(sessions)
    study_id = _store_instance(store, catalog, _copy(chest, ViewPosition="LL"), "CR_ROOM1")
    _store_instance(store, catalog, _copy(chest, ViewPosition="PA"), "CR_ROOM1")

    with sessions() as session:
        (series,) = study_series_attributes(session, store, study_id)
    assert [h.get("ViewPosition") for h in series.instances] == [("LL",), ("PA",)]
    decision = route(parse_rules(PA_ONLY), [series])
    assert decision is not None
    assert decision.series_instance_uids == (series.series_instance_uid,)

    # The rule tester reads a folder the same way.
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(_copy(chest, ViewPosition="LL"))
    (folder / "b.dcm").write_bytes(_copy(chest, ViewPosition="PA"))
    (from_folder,) = file_series_attributes(folder, "CR_ROOM1")
    assert route(parse_rules(PA_ONLY), [from_folder]) is not None


def test_study_level_query_attributes_are_derived(
    sessions: sessionmaker[Session], tmp_path: Path, shared_data: Path
) -> None:
    """ModalitiesInStudy and the counts are what a C-FIND SCP computes (PS3.4 C.6.1.1);
    image headers do not carry them, so a rule naming one silently never matched."""
    chest = shared_data / "dicom/modalities/cr/RG1_UNCR.dcm"
    store = InstanceStore(tmp_path / "var", fsync=False)
    catalog = Catalog(sessions)
    study_id = _store_instance(store, catalog, chest.read_bytes(), "CR_ROOM1")
    dx = _copy(chest, new_series=True, Modality="DX")
    _store_instance(store, catalog, dx, "CR_ROOM1")
    _store_instance(store, catalog, _copy(chest, ViewPosition="LL"), "CR_ROOM1")

    with sessions() as session:
        cr, dx_series = study_series_attributes(session, store, study_id)
    for s in (cr, dx_series):
        assert s.get("ModalitiesInStudy") == ("CR", "DX")
        assert s.get("NumberOfStudyRelatedSeries") == ("2",)
        assert s.get("NumberOfStudyRelatedInstances") == ("3",)
    assert cr.get("NumberOfSeriesRelatedInstances") == ("2",)
    assert dx_series.get("SOPClassesInStudy") == (cr.get("SOPClassUID") or ("?",))

    rules = parse_rules(
        'format = 1\n[[rule]]\nname = "cr-of-mixed"\npriority = "routine"\n'
        'models = ["lung-seg"]\n[rule.match]\nModalitiesInStudy = "DX"\nModality = "CR"\n'
        "NumberOfStudyRelatedSeries = {min = 2}\n"
    )
    decision = route(rules, [cr, dx_series])
    assert decision is not None and decision.series_instance_uids == (cr.series_instance_uid,)
    (one,) = file_series_attributes(chest)
    assert one.get("ModalitiesInStudy") == ("CR",)


def test_person_names_lose_empty_trailing_components(tmp_path: Path, shared_data: Path) -> None:
    """``SMITH^JOHN^^^`` is ``SMITH^JOHN`` (PS3.5 6.2, PN): equality must not see the carets."""
    path = tmp_path / "pn.dcm"
    path.write_bytes(
        _copy(
            shared_data / "dicom/modalities/cr/RG1_UNCR.dcm",
            ReferringPhysicianName="SMITH^JOHN^^^",
            PerformingPhysicianName="Yamada^Tarou^^=^=",
        )
    )
    (series,) = file_series_attributes(path)
    assert series.get("ReferringPhysicianName") == ("SMITH^JOHN",)
    assert series.get("PerformingPhysicianName") == ("Yamada^Tarou",)
