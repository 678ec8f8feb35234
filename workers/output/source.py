"""The source instance as the output builders hand it to highdicom.

highdicom reads only the header of a source (patient, study, geometry, UIDs), so the
builders pass a header-only copy: no pixel data is copied or decoded, and nothing
highdicom changes in it reaches the source. highdicom copies
the Patient and General Study modules verbatim (PS3.3 C.7.1.1, C.7.2.1) and refuses, or
writes an invalid object, when a source value breaks its VR (seen in the wild:
de-identification tools that put a hash in Patient's Birth Date or a 56-character
Accession Number). Such a value is emptied, which those Type 2 attributes allow; the
study still files by Study Instance UID. Only the keyword is logged, never the value.
"""

from __future__ import annotations

import copy
import logging
from typing import Final

from highdicom import SpecificCharacterSetValues
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from workers.output.errors import OutputError

log = logging.getLogger(__name__)

#: Pixel data keywords left out of a header copy.
_PIXEL_KEYWORDS: Final = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})

#: Type 2 attributes highdicom copies into every object it builds from a source.
COPIED_TYPE2: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_SEXES: Final = frozenset({"M", "F", "O", ""})

#: Character sets highdicom takes (PS3.3 C.12.1.1.2 defined terms).
_CHARSETS: Final = frozenset(term.value for term in SpecificCharacterSetValues)
#: Multi-byte code extensions, never the first of several values (PS3.3 C.12.1.1.2).
_MULTI_BYTE: Final = frozenset(
    {"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"}
)
#: Unicode in UTF-8: holds every value decoded from any other character set.
UTF8: Final = "ISO_IR 192"


def header(source: Dataset) -> Dataset:
    """Header-only copy of `source` whose copied patient/study values are valid."""
    if "StudyInstanceUID" not in source or "SOPInstanceUID" not in source:
        raise OutputError("source lacks Study or SOP Instance UID")
    view = Dataset()
    for element in source:
        if element.keyword not in _PIXEL_KEYWORDS:
            # A copy: highdicom writes into what it is given (e.g. a Spacing Between
            # Slices into the source's shared Pixel Measures item), and the source is
            # shared by every object built from it.
            view.add(copy.deepcopy(element))
    if "file_meta" in source.__dict__:
        view.file_meta = source.file_meta
    uid = str(source.SOPInstanceUID)
    if "SpecificCharacterSet" in view:
        _normalise_character_set(view, uid)
    for keyword in COPIED_TYPE2:
        if keyword not in view:
            # Type 2: must be present, may be empty when unknown (PS3.5 7.4); many
            # sources omit e.g. StudyID, and highdicom reads every one of these.
            setattr(view, keyword, None)
            continue
        if view[keyword].is_empty:
            continue
        element = view[keyword]
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, str(value), validation_mode=config.RAISE)
            if keyword == "PatientSex" and str(element.value) not in _SEXES:
                raise ValueError("not an enumerated value")
        except (ValueError, TypeError):
            log.warning("emptied invalid %s copied from sop_instance_uid=%s", keyword, uid)
            view[keyword] = type(element)(element.tag, element.VR, None)
    return view


def _normalise_character_set(view: Dataset, uid: str) -> None:
    """Give `view` a Specific Character Set highdicom writes, keeping every value.

    highdicom refuses some values found in the wild and in PS3.5 itself: an empty
    first value (the default repertoire, as in PS3.5 H.3.1's ``\\ISO 2022 IR 87``),
    a single code-extension term (``ISO 2022 IR 100``), ``ISO_IR 6``; every object
    of the study would then fail, the report included. The values were decoded when
    the source was read, so writing them as the code-extension equivalent, or else
    as UTF-8, changes their bytes but not one character.
    """
    element = view["SpecificCharacterSet"]
    values = [str(v).strip() for v in (element.value if element.VM > 1 else [element.value])]
    if element.is_empty or values == [""]:
        del view.SpecificCharacterSet  # the default repertoire (PS3.5 6.1.2.5.1)
        return
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"  # what the empty first value means
    single_ok = len(values) == 1 and values[0] in _CHARSETS and "2022" not in values[0]
    several_ok = (
        len(values) > 1
        and values[0] not in _MULTI_BYTE
        and all(v in _CHARSETS and v.startswith("ISO 2022") for v in values)
    )
    if single_ok or several_ok:
        normalised: str | list[str] = values[0] if len(values) == 1 else values
    else:
        normalised = UTF8
    if normalised != element.value:
        log.info("specific character set of sop_instance_uid=%s written as %s", uid, normalised)
        view.SpecificCharacterSet = normalised
