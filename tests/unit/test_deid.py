"""De-identification: Basic Profile attributes gone, keyed pseudonyms, references kept, valid output.

The SEG and SR are built by the real output code (workers.output) from a CR carrying
distinctive identifying values, de-identified, written, and validated with dciodvfy.
"""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.deid import DeidentificationError, Deidentifier
from node.deid_profile import BASIC_PROFILE
from tests.unit.output.conftest import CLASSIFIER, CTX, SEGMENTER, make_result, synthetic_cr
from workers.output import build_report, build_segmentation

KEY = "unit-test-key-6f1c2d9e"
IDENTIFYING = {
    "PatientName": "Zebulon^Quixotic",
    "PatientID": "PID-987654321",
    "PatientBirthDate": "19530817",
    "AccessionNumber": "ACC-55501",
    "InstitutionName": "Saint Distinctive Hospital",
    "ReferringPhysicianName": "Referrer^Rupert",
    "OtherPatientIDs": "OTHER-ID-24680",
    "PatientAge": "072Y",
    "PatientAddress": "12 Identifiable Lane",
    "StudyDescription": "CHEST Zebulon follow-up",
    "OperatorsName": "Operator^Olga",
    "StudyID": "STUDY-777",
}
#: Dates in the source; each must be shifted (or removed), never kept.
DATES = {"StudyDate": "20240101", "ContentDate": "20240102", "SeriesDate": "20240101"}


def source(study: str = "study-1", patient_id: str = IDENTIFYING["PatientID"]) -> Dataset:
    ds = synthetic_cr()
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[study])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[study, "image"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in {**IDENTIFYING, **DATES, "PatientID": patient_id}.items():
        setattr(ds, keyword, value)
    ds.StudyTime = ds.ContentTime = "101500"  # dates shift by whole hours, with their time
    ds.add_new(0x00090010, "LO", "ACME PRIVATE")
    ds.add_new(0x00091001, "LO", "private-secret-value")
    return ds


def dciodvfy_errors(ds: Dataset, path: Path) -> set[str]:
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


def dciodvfy(ds: Dataset, path: Path) -> None:
    errors = dciodvfy_errors(ds, path)
    assert not errors, f"dciodvfy {path.name}: {sorted(errors)}"


def all_values(ds: Dataset) -> str:
    return "\n".join(str(e.value) for e in ds.iterall() if e.VR not in ("OB", "OW", "SQ"))


def test_no_basic_profile_identifier_survives(tmp_path: Path) -> None:
    ds = source()
    # The synthetic CR lacks some Type 2 attributes; de-identifying must add no error.
    before = dciodvfy_errors(ds, tmp_path / "cr-original.dcm")
    originals = {
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
    }
    ds = Deidentifier(KEY).deidentify(ds)
    text = all_values(ds) + "\n" + all_values(ds.file_meta)
    for keyword, value in {**IDENTIFYING, **originals}.items():
        assert value not in text, f"{keyword} survived"
        assert str(ds.get(keyword, "")) != value
    for keyword in ("PatientAge", "OtherPatientIDs", "StudyDescription"):
        assert keyword not in ds
    assert not ds.get("OperatorsName")  # X/Z/D: emptied, valid where the IOD makes it Type 2
    assert ds.PatientBirthDate == "" and ds.PatientSex == ""
    for keyword, value in DATES.items():
        assert ds.get(keyword) and ds.get(keyword) != value, keyword
    assert "private-secret-value" not in text and 0x00091001 not in ds
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
    assert ("113100", "DCM") in codes
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # class UIDs are not identifiers
    assert dciodvfy_errors(ds, tmp_path / "cr.dcm") <= before


def test_same_patient_same_key_same_pseudonyms_across_studies() -> None:
    a, b = source("study-1"), source("study-2")
    a = Deidentifier(KEY).deidentify(a)
    b = Deidentifier(KEY).deidentify(b)
    assert (a.PatientID, a.PatientName) == (b.PatientID, b.PatientName)
    assert a.StudyInstanceUID != b.StudyInstanceUID
    # One date offset per patient: the interval between the studies is kept.
    assert a.StudyDate == b.StudyDate

    other_key = source("study-1")
    other_key = Deidentifier(KEY + "x").deidentify(other_key)
    assert other_key.PatientID != a.PatientID
    assert str(other_key.PatientName) != str(a.PatientName)
    assert other_key.StudyInstanceUID != a.StudyInstanceUID

    other_patient = source("study-3", patient_id="PID-000000001")
    other_patient = Deidentifier(KEY).deidentify(other_patient)
    assert other_patient.PatientID != a.PatientID


def test_dates_shift_by_one_offset_per_patient() -> None:
    ds = source()
    ds = Deidentifier(KEY).deidentify(ds)
    shift = datetime.strptime(DATES["StudyDate"], "%Y%m%d") - datetime.strptime(
        ds.StudyDate, "%Y%m%d"
    )
    content = datetime.strptime(DATES["ContentDate"], "%Y%m%d") - datetime.strptime(
        ds.ContentDate, "%Y%m%d"
    )
    assert shift == content and shift.days > 0


def test_seg_and_sr_reference_the_deidentified_image_and_stay_valid(tmp_path: Path) -> None:
    image = source()
    result = make_result(image, 1)
    seg = build_segmentation([result], SEGMENTER, CTX)
    sr = build_report([result], CLASSIFIER, SEGMENTER, CTX, seg)
    d = Deidentifier(KEY)
    image, seg, sr = (d.deidentify(ds) for ds in (image, seg, sr))

    assert seg.StudyInstanceUID == sr.StudyInstanceUID == image.StudyInstanceUID
    assert seg.PatientID == sr.PatientID == image.PatientID
    ref_series = seg.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == image.SeriesInstanceUID
    assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    source_ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert source_ref.SourceImageSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    sr_refs = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert image.SOPInstanceUID in sr_refs and seg.SOPInstanceUID in sr_refs
    for ds in (seg, sr):
        text = all_values(ds)
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "ReferringPhysicianName"):
            assert IDENTIFYING[keyword] not in text, keyword
    dciodvfy(seg, tmp_path / "seg.dcm")
    dciodvfy(sr, tmp_path / "sr.dcm")
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    assert back.pixel_array.astype(bool).sum() == result.lung_mask.sum()


def test_refusals() -> None:
    with pytest.raises(DeidentificationError, match="pseudonym_key"):
        Deidentifier("")
    ds = source()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="BurnedInAnnotation"):
        ds = Deidentifier(KEY).deidentify(ds)


#: Free text the Basic Profile removes (X, or X/Z: emptied) and dicognito kept.
FREE_TEXT = (
    "AcquisitionComments",
    "AcquisitionDeviceProcessingDescription",
    "DischargeDiagnosisDescription",
    "FrameComments",
    "ImagingServiceRequestComments",
    "InterpretationText",
    "PatientInstitutionResidence",
    "PerformedProcedureStepDescription",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "RequestedProcedureComments",
    "RequestedProcedureDescription",
    "ResultsComments",
    "ScheduledProcedureStepDescription",
    "ServiceEpisodeDescription",
    "TextComments",
    "VisitComments",
    "ContrastBolusAgent",
    "InstitutionName",
    "StationName",
)


def test_free_text_is_removed_at_every_depth(tmp_path: Path) -> None:
    ds = source()
    before = dciodvfy_errors(ds, tmp_path / "cr-original.dcm")
    for keyword in FREE_TEXT:
        setattr(ds, keyword, f"Zebulon {len(keyword)}")
    referenced = Dataset()  # a reference receivers need (X/Z/U*): kept, its text cleaned
    referenced.ReferencedSOPClassUID = ds.SOPClassUID
    referenced.ReferencedSOPInstanceUID = original_ref = generate_uid()
    referenced.StudyDescription = "Prior chest for Zebulon Quixotic"
    referenced.PatientAge = "071Y"
    referenced.AcquisitionComments = "Zebulon moved"
    ds.ReferencedImageSequence = [referenced]
    patient = Dataset()  # X: removed whole
    patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    patient.ReferencedSOPInstanceUID = generate_uid()
    patient.StudyDescription = "Chest for Zebulon Quixotic"
    ds.ReferencedPatientSequence = [patient]
    study = Dataset()  # X/Z, Type 3 here: removed (an empty Type 3 sequence is invalid)
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedStudySequence = [study]
    context = Dataset()  # X/Z, Type 2 in its module: emptied
    context.ValueType = "TEXT"
    context.TextValue = "Zebulon held his breath"
    ds.AcquisitionContextSequence = [context]
    ds.add_new(0x60000010, "US", 512)  # an overlay (its data and comments are X): gone whole
    ds.add_new(0x60004000, "LT", "Zebulon's overlay")
    d = Deidentifier(KEY)

    ds = d.deidentify(ds)
    text = all_values(ds)
    assert "Zebulon" not in text and "071Y" not in text
    for keyword in FREE_TEXT:
        assert not ds.get(keyword), keyword
    kept = ds.ReferencedImageSequence[0]
    assert kept.ReferencedSOPInstanceUID == d.uid(original_ref)
    assert "StudyDescription" not in kept and "PatientAge" not in kept
    assert "ReferencedPatientSequence" not in ds
    assert "ReferencedStudySequence" not in ds
    assert len(ds.AcquisitionContextSequence) == 0
    assert not [e for e in ds if e.tag.group == 0x6000]
    assert dciodvfy_errors(ds, tmp_path / "cr.dcm") <= before


def test_dummy_values_are_keyed_or_refused() -> None:
    ds = source()
    ds.ClinicalTrialSubjectID = "TRIAL-ZEBULON"  # D: a keyed dummy, the same for the same value
    d = Deidentifier(KEY)
    first, second = d.deidentify(ds), d.deidentify(ds)
    assert first.ClinicalTrialSubjectID == second.ClinicalTrialSubjectID
    assert first.ClinicalTrialSubjectID and "ZEBULON" not in first.ClinicalTrialSubjectID

    ds.add_new(0x00420011, "OB", b"%PDF Zebulon Quixotic")  # EncapsulatedDocument: D, binary
    with pytest.raises(DeidentificationError, match="Encapsulated Document"):
        d.deidentify(ds)


def test_profile_table_codes() -> None:
    codes = set(BASIC_PROFILE.values())
    assert codes <= {"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
    assert BASIC_PROFILE[0x00184000] == "X"  # Acquisition Comments
    assert BASIC_PROFILE[0x00080018] == "U"  # SOP Instance UID
    assert BASIC_PROFILE[0x00082112] == "X/Z/U*"  # Source Image Sequence
    # Content Sequence: D (a dummy) in PS3.15 2026c, not X as in editions before; kept
    # cleaned only with the Clean Structured Content Option, which is not claimed.
    assert BASIC_PROFILE[0x0040A730] == "D"


# -- SR content: Content Sequence is D, so free text in content items becomes dummies ----


def _report(image: Dataset) -> Dataset:
    """The node's own SR of `image`, built as workers.output builds it."""
    result = make_result(image, 1)
    seg = build_segmentation([result], SEGMENTER, CTX)
    return build_report([result], CLASSIFIER, SEGMENTER, CTX, seg)


def _assert_no_trace(data: bytes, *values: str) -> None:
    """None of `values`, nor any part of a person name, appears in `data` in any case."""
    folded = data.lower()
    parts = {part for value in values for part in [value, *value.split("^")]}
    found = sorted(part for part in parts if part.lower().encode() in folded)
    assert not found, f"left in the de-identified bytes: {found}"


def _text_values(ds: Dataset) -> list[str]:
    return [str(e.value) for e in ds.iterall() if e.keyword == "TextValue"]


def test_our_sr_leaves_no_text_or_identifier_and_stays_valid(tmp_path: Path) -> None:
    image = source()
    sr = _report(image)
    originals = _text_values(sr)  # TID 4019 algorithm name and version, tracking ids, ...
    assert "pneumonia-densenet" in originals
    d = Deidentifier(KEY)

    out = d.deidentify(sr)
    dummies = _text_values(out)
    assert len(dummies) == len(originals) and not set(dummies) & set(originals)
    # Keyed: the same text gets the same dummy, so equal tracking identifiers stay equal.
    assert [dummies.index(v) for v in dummies] == [originals.index(v) for v in originals]
    dciodvfy(out, tmp_path / "sr.dcm")
    _assert_no_trace(
        (tmp_path / "sr.dcm").read_bytes(),
        IDENTIFYING["PatientName"],
        IDENTIFYING["PatientID"],
        IDENTIFYING["AccessionNumber"],
        "Zebulon",
        *(str(image[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")),
        str(sr.SOPInstanceUID),
    )


def test_names_and_text_nested_in_sr_content_leave_no_trace(tmp_path: Path) -> None:
    """A report that names the patient in TEXT and PNAME items, two levels down."""
    image = source()
    sr = _report(image)
    name = "Quixotic^Zebulon"
    prior = generate_uid()
    note = hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value="Zebulon Quixotic, seen 2024-01-01 at Saint Distinctive: no change",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    note.ContentSequence = [
        hd.sr.PnameContentItem(
            name=codes.DCM.PersonObserverName,
            value=name,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
        ),
        hd.sr.UIDRefContentItem(
            name=codes.DCM.StudyInstanceUID,
            value=prior,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_OBS_CONTEXT,
        ),
    ]
    sr.ContentSequence[-1].ContentSequence.append(note)
    assert dciodvfy_errors(sr, tmp_path / "sr-original.dcm") == set()
    assert name in (tmp_path / "sr-original.dcm").read_bytes().decode("latin-1")
    d = Deidentifier(KEY)

    out = d.deidentify(sr)
    dciodvfy(out, tmp_path / "sr.dcm")
    data = (tmp_path / "sr.dcm").read_bytes()
    _assert_no_trace(data, name, "Saint Distinctive", prior, IDENTIFYING["PatientID"])
    assert d.uid(prior).encode() in data  # the reference is kept, under its pseudonym
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    names = [e.value for e in back.iterall() if e.keyword == "PersonName"]
    assert len(names) == 1 and str(names[0]) != name
