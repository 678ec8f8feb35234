"""Coded concepts of the objects we write (PS3.16), with our private scheme declared.

Standard codes wherever one exists: SNOMED CT for anatomy, finding and qualifiers,
UCUM for units, DCM for the TID 1500 structure. Where no standard concept fits (the
model's output probability), the code is ours, in the private scheme ``99TRIAGE``
(PS3.16 8.1: a designator starting with "99" is private), declared in each object's
Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2).
"""

from __future__ import annotations

from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

#: Private coding scheme designator (PS3.16 8.1).
PRIVATE_SCHEME: Final = "99TRIAGE"


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Declaration of ``99TRIAGE`` for the Coding Scheme Identification Sequence."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="triage-node private codes",
        version="1",
        responsible_organization="triage-node developers",
    )


# Anatomy (CID 7150 category, CID 7151 types).
ANATOMICAL_STRUCTURE: Final = Code("91723000", "SCT", "Anatomical Structure")
LUNG: Final = Code("39607008", "SCT", "Lung")
RIGHT_LUNG: Final = Code("3341006", "SCT", "Right lung")
LEFT_LUNG: Final = Code("44029006", "SCT", "Left lung")

# Finding and its qualitative value (CID 210 Present/Absent).
PNEUMONIA: Final = Code("233604007", "SCT", "Pneumonia")
PRESENT: Final = Code("52101004", "SCT", "Present")
ABSENT: Final = Code("2667000", "SCT", "Absent")

# Measurements.
AREA: Final = Code("42798000", "SCT", "Area")
PNEUMONIA_PROBABILITY: Final = Code("PNEUMPROB", PRIVATE_SCHEME, "Probability of pneumonia")

# Units (UCUM).
SQUARE_MILLIMETER: Final = Code("mm2", "UCUM", "square millimeter")
NO_UNITS: Final = Code("1", "UCUM", "no units")

# Procedure reported in TID 1500.
PLAIN_CHEST_XRAY: Final = Code("399208008", "SCT", "Plain chest X-ray")

# Observer type (CID 270) and algorithm family (CID 7162).
DEVICE: Final = Code("121007", "DCM", "Device")
ARTIFICIAL_INTELLIGENCE: Final = Code("123110", "DCM", "Artificial Intelligence")


def algorithm_family(family: str) -> Code:
    """Code for an algorithm family name (CID 7162); unknown names become private codes."""
    if family.strip().lower() == ARTIFICIAL_INTELLIGENCE.meaning.lower():
        return ARTIFICIAL_INTELLIGENCE
    # Code Value is SH (16 characters), Code Meaning LO (64; PS3.5 6.2).
    return Code(family.upper().replace(" ", "_")[:16], PRIVATE_SCHEME, family[:64])
