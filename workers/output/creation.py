"""When an object was created, in a form a reader in another time zone can place.

highdicom stamps Instance Creation and Content Date/Time with the worker's local
clock, and DICOM reads such times as local to whoever made them. A worker in a
container runs in UTC unless told otherwise, so a site an hour or more from UTC would
see its results dated at the wrong hour. Timezone Offset From UTC (PS3.3 C.12.1.1.8)
says which clock it was.
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset


def stamp_timezone(ds: Dataset) -> None:
    """Record the offset of the local clock highdicom has just used for `ds`'s times."""
    ds.TimezoneOffsetFromUTC = datetime.now().astimezone().strftime("%z")
