"""Which images the chest models apply to, judged on headers read without pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from models.registry import CLASSIFIER_NAME, SEGMENTER_NAME
from tests.unit.workers.conftest import build
from workers.selection import (
    CHEST_RADIOGRAPH,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    DX_IMAGE_STORAGE_FOR_PROCESSING,
    UnknownModel,
    selector_for,
)


def _header(dicom_dir: Path, name: str) -> Dataset:
    return dcmread(dicom_dir / name, stop_before_pixels=True, force=True)


def _chest(**attributes: object) -> Dataset:
    """A frontal chest CR header; attributes override (None deletes)."""
    ds = build(
        None,
        PhotometricInterpretation="MONOCHROME1",
        BodyPartExamined="CHEST",
        ViewPosition="PA",
    )
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def test_both_chest_models_use_the_chest_selector() -> None:
    assert selector_for(CLASSIFIER_NAME) is CHEST_RADIOGRAPH
    assert selector_for(SEGMENTER_NAME) is CHEST_RADIOGRAPH
    with pytest.raises(UnknownModel, match="no image selector for model 'knee-ai'"):
        selector_for("knee-ai")


@pytest.mark.parametrize("name", ["modalities/cr/RG1_UNCR.dcm", "modalities/dx/966_fixed.dcm"])
def test_chest_radiographs_are_selected(dicom_dir: Path, name: str) -> None:
    ds = _header(dicom_dir, name)
    assert CHEST_RADIOGRAPH.why_not(ds) is None
    assert CHEST_RADIOGRAPH.applies_to(ds)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("modalities/cr/RG3_J2KR.dcm", "BodyPartExamined EXTREMITY is not one of"),
        ("modalities/cr/RG2_JLSL.dcm", "BodyPartExamined HIP is not one of"),
        ("modalities/ct/TOSHIBA_J2K_OpenJPEGv2Regression.dcm", "Modality CT is not one of CR, DX"),
        ("modalities/multi-frame/emri_small.dcm", "Modality MR"),
        ("modalities/sr/test-SR.dcm", "Modality SR"),
        ("broken/no_meta.dcm", "Modality (absent)"),
    ],
)
def test_other_images_are_not(dicom_dir: Path, name: str, reason: str) -> None:
    ds = _header(dicom_dir, name)
    why = CHEST_RADIOGRAPH.why_not(ds)
    assert why is not None and why.startswith("chest radiograph: ")
    assert reason in why
    assert not CHEST_RADIOGRAPH.applies_to(ds)


def test_dx_for_processing_is_not_selected() -> None:
    presentation = _chest(Modality="DX", SOPClassUID=DX_IMAGE_STORAGE_FOR_PRESENTATION)
    assert CHEST_RADIOGRAPH.applies_to(presentation)
    processing = _chest(Modality="DX", SOPClassUID=DX_IMAGE_STORAGE_FOR_PROCESSING)
    assert "SOP Class Digital X-Ray Image Storage - For Processing is not accepted" in str(
        CHEST_RADIOGRAPH.why_not(processing)
    )


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"ViewPosition": "LL"}, "ViewPosition LL is excluded"),
        ({"PhotometricInterpretation": "RGB"}, "Photometric Interpretation RGB is not grayscale"),
        ({"NumberOfFrames": 3}, "Number of Frames 3 is more than 1"),
        ({"BodyPartExamined": "ABDOMEN"}, "BodyPartExamined ABDOMEN"),
    ],
)
def test_header_exclusions(attributes: dict[str, object], reason: str) -> None:
    assert reason in str(CHEST_RADIOGRAPH.why_not(_chest(**attributes)))


@pytest.mark.parametrize("value", ["chest", " Chest ", "THORAX", "LUNG"])
def test_body_part_ignores_case_and_padding(value: str) -> None:
    assert CHEST_RADIOGRAPH.applies_to(_chest(BodyPartExamined=value))


@pytest.mark.parametrize(
    ("attributes", "applies"),
    [
        ({"StudyDescription": "CHEST PA/LAT"}, True),
        ({"SeriesDescription": "cxr portable"}, True),
        ({"ProtocolName": "Thorax pa"}, True),
        ({"BodyPartExamined": "", "StudyDescription": "Thorax 1 Ebene"}, True),
        ({"StudyDescription": "KNEE"}, False),
        ({"StudyDescription": "CHESTNUT"}, False),  # whole words only
        ({}, False),  # no body part and no description: not assumed to be a chest
    ],
)
def test_description_decides_without_body_part(attributes: dict[str, str], applies: bool) -> None:
    ds = _chest(**{"BodyPartExamined": None, **attributes})
    assert CHEST_RADIOGRAPH.applies_to(ds) is applies


def test_body_part_wins_over_description() -> None:
    assert not CHEST_RADIOGRAPH.applies_to(_chest(BodyPartExamined="HIP", StudyDescription="CHEST"))


def test_reasons_carry_no_free_text() -> None:
    ds = _chest(BodyPartExamined=None, StudyDescription="Doe Jane knee follow-up")
    why = CHEST_RADIOGRAPH.why_not(ds)
    assert why is not None and "Doe" not in why and "knee" not in why.lower()


def test_every_corpus_header_gets_an_answer(dicom_corpus: list[Path]) -> None:
    """Odd headers (NumberOfFrames "1A", no file meta, VR UN) give a reason, not an error."""
    selected = []
    for path in dicom_corpus:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        if CHEST_RADIOGRAPH.why_not(ds) is None:
            selected.append(path.name)
    assert sorted(selected) == ["966_fixed.dcm", "RG1_J2KI.dcm", "RG1_UNCR.dcm"]


def _view_code(scheme: str, value: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "view"
    return [item]


@pytest.mark.parametrize(
    "attributes",
    [
        {"ViewPosition": "", "PatientOrientation": ["A", "F"]},
        {"ViewPosition": None, "PatientOrientation": ["P", "F"]},
        {"ViewPosition": "", "PatientOrientation": ["LP", "F"]},  # oblique
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SCT", "399173006")},  # left lateral
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SCT", "399198007")},  # right lateral
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SCT", "399067008")},  # lateral
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SRT", "R-10236")},  # left lateral
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SRT", "R-10232")},  # right lateral
    ],
)
def test_lateral_views_without_view_position_are_excluded(attributes: dict[str, object]) -> None:
    """View Position is Type 2 in CR: orientation or view code still tell a lateral."""
    why = CHEST_RADIOGRAPH.why_not(_chest(**attributes))
    assert why is not None and "lateral" in why


@pytest.mark.parametrize(
    "attributes",
    [
        {"ViewPosition": "", "PatientOrientation": ["L", "F"]},
        {"ViewPosition": "", "PatientOrientation": ["R", "F"]},
        {"ViewPosition": None},
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SCT", "399348003")},  # AP
        {"ViewPosition": "", "ViewCodeSequence": _view_code("SRT", "R-40888")},  # PA
        {"ViewPosition": "", "ViewCodeSequence": []},
    ],
)
def test_frontal_views_with_empty_view_position_are_selected(
    attributes: dict[str, object],
) -> None:
    assert CHEST_RADIOGRAPH.why_not(_chest(**attributes)) is None


def test_excluded_view_codes_are_lateral_or_oblique_in_pydicoms_tables() -> None:
    """Every excluded code is a CID 4010 DX View named lateral or oblique, and each SRT
    code is the SNOMED CT code's legacy equivalent, as pydicom's tables have them."""
    from pydicom.sr import _cid_dict, _concepts_dict, _snomed_dict

    dx_views = {
        code: meaning
        for keyword in _cid_dict.cid_concepts[4010]["SCT"]
        for code, (meaning, _) in _concepts_dict.concepts["SCT"][keyword].items()
    }
    codes = CHEST_RADIOGRAPH.exclude_view_codes
    sct = {value for scheme, value in codes if scheme == "SCT"}
    assert {"399067008", "399173006", "399198007"} <= sct  # lateral, left, right lateral
    for value in sct:
        assert "lateral" in dx_views[value] or "oblique" in dx_views[value], value
        assert ("SRT", _snomed_dict.mapping["SCT"][value]) in codes
    assert not {"272479007", "399348003", "399033003"} & sct  # PA, AP, frontal
