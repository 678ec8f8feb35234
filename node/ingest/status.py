"""C-STORE response statuses used by the node (PS3.4 Annex B.2.3, PS3.7 Annex C).

Named so that a status in a log or a test reads as what it means.
"""

from __future__ import annotations

SUCCESS = 0x0000

#: Refused: Out of Resources (A7xx). The SCU may retry later; nothing was stored.
OUT_OF_RESOURCES_DISK = 0xA700
#: Out of resources because the database could not record the instance.
OUT_OF_RESOURCES_DATABASE = 0xA701
#: Out of resources because the pipeline is too far behind (pipeline.max_backlog_studies).
OUT_OF_RESOURCES_BACKLOG = 0xA702

#: Error: Data Set does not match SOP Class (A9xx): the dataset's SOP Class UID
#: disagrees with the Affected SOP Class UID of the request.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900

#: Error: Cannot understand (Cxxx). We use sub-codes so that an admin can tell
#: the reasons apart from the SCU's log alone; the quarantine record has the text.
CANNOT_UNDERSTAND = 0xC000
CANNOT_PARSE = 0xC001
MISSING_ATTRIBUTE = 0xC002
INVALID_UID = 0xC003
SOP_INSTANCE_MISMATCH = 0xC004
PIXEL_DATA_INCONSISTENT = 0xC005
INTERNAL_ERROR = 0xC0FF

DESCRIPTIONS: dict[int, str] = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES_DISK: "Refused: Out of Resources (disk)",
    OUT_OF_RESOURCES_DATABASE: "Refused: Out of Resources (database)",
    OUT_OF_RESOURCES_BACKLOG: "Refused: Out of Resources (pipeline backlog)",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    CANNOT_PARSE: "Error: Cannot understand (dataset cannot be parsed)",
    MISSING_ATTRIBUTE: "Error: Cannot understand (required attribute missing)",
    INVALID_UID: "Error: Cannot understand (invalid UID)",
    SOP_INSTANCE_MISMATCH: "Error: Cannot understand (SOP Instance UID differs from request)",
    PIXEL_DATA_INCONSISTENT: "Error: Cannot understand (pixel data inconsistent with header)",
    INTERNAL_ERROR: "Error: Cannot understand (internal error, instance quarantined)",
}


def is_failure(status: int) -> bool:
    """Failure statuses per PS3.4 B.2.3 (A7xx, A9xx, Cxxx); 0xB... are warnings."""
    return (status & 0xF000) in (0xA000, 0xC000)
