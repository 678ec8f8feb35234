"""The attribute names a rule may test: DICOM keywords (PS3.6) plus ``CallingAETitle``.

The value representation decides how a condition compares: CS and PN values
compare case-insensitively, numeric VRs allow ranges, sequences and bulk data only
presence.
"""

from __future__ import annotations

import difflib
from functools import cache

from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict, tag_for_keyword

#: Not a DICOM attribute: the AE title of the association that sent the study.
CALLING_AE_TITLE = "CallingAETitle"

#: VRs whose values are numbers (or read as numbers: dates, times, ages in years).
_NUMERIC_VRS = frozenset(
    {"DS", "IS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AS", "DA", "TM", "DT"}
)
#: VRs whose values are not text a rule can compare: only presence is testable.
_OPAQUE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "NONE"})


#: Headers are read up to the pixel data (``stop_before_pixels``): from Float Pixel
#: Data (7FE0,0008) on, nothing is seen.
_FIRST_UNREAD_TAG = 0x7FE00008


def is_known(keyword: str) -> bool:
    return keyword == CALLING_AE_TITLE or tag_for_keyword(keyword) is not None


#: The Code Sequence Macro (PS3.3 8.8): attributes only ever found in sequence items
#: (ProcedureCodeSequence, ViewCodeSequence, ...), which rules do not look into.
_ONLY_IN_SEQUENCE_ITEMS = frozenset(
    {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "LongCodeValue",
        "URNCodeValue",
        "MappingResource",
        "ContextIdentifier",
        "ContextUID",
    }
)


def is_single_valued(keyword: str) -> bool:
    """The dictionary allows ``keyword`` one value only (VM 1, PS3.6)."""
    if keyword == CALLING_AE_TITLE:
        return True
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VM(tag) == "1"


def is_read(keyword: str) -> bool:
    """Routing sees ``keyword`` (pixel data and what follows it are never read)."""
    tag = tag_for_keyword(keyword)
    return tag is None or tag < _FIRST_UNREAD_TAG


def only_in_sequence_items(keyword: str) -> bool:
    return keyword in _ONLY_IN_SEQUENCE_ITEMS


@cache
def vr_of(keyword: str) -> str:
    """The VR of ``keyword`` as the dictionary writes it (``"US or SS"`` for ambiguous ones)."""
    if keyword == CALLING_AE_TITLE:
        return "AE"
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return str(dictionary_VR(tag))


def _vrs(keyword: str) -> list[str]:
    return vr_of(keyword).split(" or ")


def is_case_insensitive(keyword: str) -> bool:
    """CS (Code String) and PN (Person Name) values are compared ignoring case.

    CS values are upper case by definition (PS3.5 6.2); names may be matched
    ignoring case (PS3.4 C.2.2.2.1), and senders differ in how they write them.
    Everything else compares exactly.
    """
    return _vrs(keyword) in (["CS"], ["PN"])


def is_numeric(keyword: str) -> bool:
    return any(vr in _NUMERIC_VRS for vr in _vrs(keyword))


def is_opaque(keyword: str) -> bool:
    return all(vr in _OPAQUE_VRS for vr in _vrs(keyword))


def same_in_series(keyword: str) -> bool:
    """Every image of a series has the same value (:data:`SAME_IN_SERIES`)."""
    return keyword in SAME_IN_SERIES


def suggest(keyword: str) -> str | None:
    """The known keyword closest to a misspelt one, if any is close."""
    if keyword.lower() == CALLING_AE_TITLE.lower():
        return CALLING_AE_TITLE
    by_lower = {k.lower(): k for k in keyword_dict}
    if keyword.lower() in by_lower:
        return by_lower[keyword.lower()]
    close = difflib.get_close_matches(keyword, [*keyword_dict, CALLING_AE_TITLE], n=1, cutoff=0.8)
    return close[0] if close else None


#: Attributes every image of a series shares: those of the Patient, General Study,
#: Patient Study, General Series, General Equipment and Frame of Reference modules
#: (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.3.1, C.7.5.1, C.7.4.1), the sending AE and
#: the query keys derived per study or series. When a series' first image fails a
#: condition on one of them, its other images need not be read.
SAME_IN_SERIES = frozenset(
    {
        CALLING_AE_TITLE,
        # Patient
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientSpeciesDescription",
        "PatientBreedDescription",
        "PatientIdentityRemoved",
        # General Study, Patient Study
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
        "ReferringPhysicianName",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "PregnancyStatus",
        # General Series
        "Modality",
        "SeriesInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "SeriesDescription",
        "Laterality",
        "ProtocolName",
        "BodyPartExamined",
        "PatientPosition",
        "OperatorsName",
        "PerformingPhysicianName",
        # General Equipment
        "Manufacturer",
        "ManufacturerModelName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "StationName",
        # Frame of Reference
        "FrameOfReferenceUID",
        # query keys (node.routing.attributes derives them)
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
    }
)
