"""Every result object files under the source's patient and study, whatever it carries.

A PACS files (and reconciles) by more than Patient ID: Issuer of Patient ID and its
qualifiers say which domain the ID is from, Issuer of Accession Number which RIS
issued the order. An object that drops them can land under another patient, or be
rejected as a mismatch, while its siblings from the same run file correctly.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.unit.output.conftest import CLASSIFIER, CTX, SEGMENTER, make_result, synthetic_cr
from workers.result_objects import build_objects

#: Patient and study attributes (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2) a PACS may file by.
IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "PatientAge",
)


def _item(**values: str) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def identified_source() -> Dataset:
    """A CR whose patient is identified within a domain, as an enterprise PACS needs."""
    ds = synthetic_cr()
    ds.IssuerOfPatientID = "HOSP-A"
    ds.IssuerOfPatientIDQualifiersSequence = [
        _item(UniversalEntityID="1.2.276.0.7230010.3.0.1", UniversalEntityIDType="ISO")
    ]
    ds.OtherPatientIDsSequence = [
        _item(PatientID="OLD-0815", IssuerOfPatientID="HOSP-B", TypeOfPatientID="TEXT")
    ]
    ds.IssuerOfAccessionNumberSequence = [_item(LocalNamespaceEntityID="RIS-A")]
    ds.StudyDescription = "XR CHEST PA"
    ds.PatientAge = "054Y"
    return ds


def _encoded(ds: Dataset) -> Dataset:
    """`ds` as a stored file reads it: written and parsed back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_every_object_keeps_the_sources_patient_and_study_identity(
    read_back: Callable[[Dataset, str], Dataset],
) -> None:
    source = identified_source()
    objects = build_objects(
        [make_result(source, 1)], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX
    )
    assert sorted(kind for kind, _ in objects) == ["sc", "seg", "sr"]
    for kind, ds in objects:
        back = read_back(ds, f"identity-{kind}")
        for keyword in IDENTITY_KEYWORDS:
            assert keyword in back, f"{kind} lacks {keyword}"
            assert back[keyword].value == source[keyword].value, f"{kind} {keyword}"


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1


@pytest.mark.parametrize(
    ("charset", "name", "written"),
    [
        ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
        ("ISO_IR 192", "Müller^Jürgen", "ISO_IR 192"),
        ("ISO_IR 192", "山田^太郎", "ISO_IR 192"),
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", None),
        # Values highdicom refuses, seen in the wild (and in PS3.5 H.3.1): written as
        # their equivalent, or as UTF-8, rather than failing every object.
        (["", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        ("ISO 2022 IR 100", "Müller^Jürgen", "ISO_IR 192"),  # ELSCINT1_JP2vsJ2K.dcm
        ("ISO_IR 6", "Doe^John", "ISO_IR 192"),
    ],
)
def test_names_keep_their_characters(
    charset: str | list[str],
    name: str,
    written: str | list[str] | None,
    read_back: Callable[[Dataset, str], Dataset],
) -> None:
    source = synthetic_cr()
    source.SpecificCharacterSet = charset
    source.PatientName = name
    source.ReferringPhysicianName = "Dürr^Änne"
    source = _encoded(source)  # decoded from its bytes, as the worker reads it
    objects = build_objects(
        [make_result(source, 1)], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX
    )
    for kind, ds in objects:
        back = read_back(ds, f"charset-{kind}")
        assert back.SpecificCharacterSet == (written or charset), kind
        assert str(back.PatientName) == name, kind
        # As the source holds it (its character set may not have these letters).
        assert str(back.ReferringPhysicianName) == str(source.ReferringPhysicianName), kind
