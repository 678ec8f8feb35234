"""Read just enough of a received dataset to file it, and refuse what cannot be filed.

No pixel data is decoded here (the SCP must answer fast); pixel data is only
checked for a size or structure that contradicts the header.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from node.errors import RejectedInstance
from node.ingest import status

#: PS3.5 9.1: components of digits, no leading zero unless the component is "0".
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_PIXEL_DATA = 0x7FE00010
_DEFER = 64 * 1024
#: PS3.5 sets no limit; real objects nest a handful deep (SR content trees the most).
_MAX_DEPTH = 64
_VRS = frozenset(vr.value for vr in VR)
#: Binary VRs of fixed value size (PS3.5 6.2): a value length that is not a multiple
#: cannot be decoded, by us later or by the PACS.
_VALUE_SIZE = {
    "AT": 4, "FL": 4, "FD": 8, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2,
    "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8, "US or SS": 2,
}  # fmt: skip


def is_valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.match(value) is not None


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """What the catalogue records of one instance (PS3.3 patient/study/series/image modules)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    body_part_examined: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    photometric_interpretation: str | None = None


def inspect_instance(
    data: bytes, *, requested_sop_class_uid: str, requested_sop_instance_uid: str
) -> InstanceHeader:
    """Parse the Part 10 bytes ``data`` and check them against the C-STORE request.

    Raises :class:`RejectedInstance` with the status to answer (PS3.4 B.2.3).
    """
    try:
        ds = dcmread(BytesIO(data), defer_size=_DEFER)
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # Offsets then point into the inflated stream: read it all, defer nothing.
            ds = dcmread(BytesIO(data))
        _check_encoding(ds)
        header = _header(ds)
    except RejectedInstance:
        raise
    except Exception as exc:  # pydicom raises many types for malformed input
        raise RejectedInstance(
            status.CANNOT_PARSE, f"dataset cannot be parsed: {type(exc).__name__}"
        ) from exc

    if header.sop_class_uid != requested_sop_class_uid:
        raise RejectedInstance(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID {header.sop_class_uid} differs from the request's "
            f"{requested_sop_class_uid}",
            requested_sop_instance_uid,
        )
    if header.sop_instance_uid != requested_sop_instance_uid:
        raise RejectedInstance(
            status.SOP_INSTANCE_MISMATCH,
            f"SOPInstanceUID {header.sop_instance_uid} differs from the request's "
            f"{requested_sop_instance_uid}",
            requested_sop_instance_uid,
        )
    deflated = header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    # Deflated datasets are read whole, so every value's own length tells.
    _check_truncation(ds, header, sys.maxsize if deflated else len(data))
    _check_structure(ds, header)
    _check_pixel_data(ds, header)
    return header


def _check_encoding(ds: Dataset) -> None:
    """Refuse a data set not encoded in the transfer syntax it was sent with (PS3.5 10).

    pydicom notices implicit VR under an explicit VR transfer syntax (and the
    reverse) and reads on regardless; the node would then keep, and later send on,
    bytes whose file meta lies about them. Must run before any element is read,
    while the elements still say how they were found.
    """
    meta = getattr(ds, "file_meta", None)
    tsuid = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not tsuid.is_transfer_syntax:
        return
    first = next(iter(ds._dict.values()), None)
    if not isinstance(first, RawDataElement):
        return
    if first.is_implicit_VR != tsuid.is_implicit_VR:
        found, declared = (
            ("implicit", "explicit") if first.is_implicit_VR else ("explicit", "implicit")
        )
        raise RejectedInstance(
            status.CANNOT_PARSE,
            f"data set is encoded in {found} VR, its transfer syntax {tsuid} is {declared} VR",
        )


def _text(ds: Dataset, keyword: str, limit: int = 324) -> str | None:
    """A string attribute, or None. Multi-valued strings keep DICOM's backslash."""
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return None
    if isinstance(elem, list | tuple) or type(elem).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in elem)
    else:
        value = str(elem)
    value = value.strip()
    return value[:limit] or None


#: The range of an IS value (PS3.5 6.2), and of the catalogue's integer columns.
_IS_RANGE = range(-(2**31), 2**31)


def _int(ds: Dataset, keyword: str, *, required_valid: bool = False) -> int | None:
    """An integer attribute, or None; out of the IS range counts as invalid.

    With ``required_valid`` an invalid value refuses the instance (0xC000);
    otherwise the attribute is informative only and left out.
    """
    raw: Any = ds.get(keyword)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
        if value not in _IS_RANGE:
            raise ValueError(f"{keyword} out of range")
        return value
    except (TypeError, ValueError) as exc:
        if required_valid:
            raise RejectedInstance(
                status.CANNOT_UNDERSTAND, f"{keyword} has an invalid value"
            ) from exc
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        raise RejectedInstance(status.MISSING_ATTRIBUTE, f"{keyword} is missing")
    text = str(value).strip().rstrip("\x00")
    if not is_valid_uid(text):
        raise RejectedInstance(status.INVALID_UID, f"{keyword} is not a valid UID")
    return text


def _header(ds: Dataset) -> InstanceHeader:
    meta = getattr(ds, "file_meta", None)
    tsuid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return InstanceHeader(
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=tsuid,
        modality=_text(ds, "Modality", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
        patient_sex=_text(ds, "PatientSex", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        body_part_examined=_text(ds, "BodyPartExamined", 64),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        instance_number=_int(ds, "InstanceNumber"),
        rows=_int(ds, "Rows", required_valid=True),
        columns=_int(ds, "Columns", required_valid=True),
        number_of_frames=_int(ds, "NumberOfFrames", required_valid=True),
        photometric_interpretation=_text(ds, "PhotometricInterpretation", 16),
    )


def _check_truncation(ds: Dataset, header: InstanceHeader, stream_length: int) -> None:
    """Refuse a dataset whose last element claims more bytes than were sent.

    pydicom stops quietly at the end of a short stream; DCMTK would refuse the
    same bytes ("premature end of stream"), and so do we.
    """
    for elem in ds._dict.values():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        # A deferred value is not read; what the stream still holds after its offset is.
        available = len(elem.value) if elem.value is not None else stream_length - elem.value_tell
        if available < elem.length:
            raise RejectedInstance(
                status.CANNOT_PARSE,
                f"dataset truncated in element {elem.tag}: {available} of {elem.length} bytes",
                header.sop_instance_uid,
            )


def _check_structure(ds: Dataset, header: InstanceHeader, depth: int = 0) -> None:
    """Refuse unknown VRs, binary values of impossible length, and sequences whose
    items do not parse, at any depth.

    The top level is walked by ``dcmread`` already; sequence contents are not until
    someone reads them, so a broken item would be acknowledged and only fail later,
    in the worker or at the PACS. Only element headers and sequences are read here,
    no values.
    """
    if depth > _MAX_DEPTH:
        raise RejectedInstance(
            status.CANNOT_PARSE,
            f"sequences nested deeper than {_MAX_DEPTH}",
            header.sop_instance_uid,
        )
    for tag, found in list(ds._dict.items()):
        elem: DataElement | RawDataElement = found
        if tag.group == 0xFFFE:
            # Item and delimitation tags belong inside sequences and encapsulated
            # pixel data only (PS3.5 7.5); here they mean a sequence's length lied.
            raise RejectedInstance(
                status.CANNOT_PARSE,
                f"item or delimitation tag {tag} outside a sequence",
                header.sop_instance_uid,
            )
        if isinstance(elem, RawDataElement):
            if _checked_vr(elem, header) != "SQ":
                continue
            try:
                elem = ds[tag]
            except Exception as exc:  # pydicom raises many types for malformed items
                raise RejectedInstance(
                    status.CANNOT_PARSE,
                    f"sequence {elem.tag} cannot be parsed: {type(exc).__name__}",
                    header.sop_instance_uid,
                ) from exc
        # Undefined-length sequences were parsed while reading; their items hold raw elements.
        if elem.VR == "SQ":
            for item in elem.value or ():
                if isinstance(item, Dataset):
                    _check_structure(item, header, depth + 1)


def _checked_vr(elem: RawDataElement, header: InstanceHeader) -> str | None:
    """A raw element's VR (the dictionary's under implicit VR; None if unknown there),
    refused if it is no VR at all or its value length cannot hold whole values."""
    vr = elem.VR
    if vr is not None and vr not in _VRS:
        raise RejectedInstance(
            status.CANNOT_PARSE, f"element {elem.tag} has an unknown VR", header.sop_instance_uid
        )
    if vr is None and not elem.tag.is_private:
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    size = _VALUE_SIZE.get(vr or "")
    if size and elem.length != 0xFFFFFFFF and elem.length % size:
        raise RejectedInstance(
            status.CANNOT_PARSE,
            f"element {elem.tag} ({vr}) has {elem.length} bytes, not a multiple of {size}",
            header.sop_instance_uid,
        )
    return vr


def _check_pixel_data(ds: Dataset, header: InstanceHeader) -> None:
    """Refuse pixel data whose size or encapsulation contradicts the header (no decoding)."""
    if _PIXEL_DATA not in ds:
        return
    # The stubs say DataElement, but a deferred read returns the RawDataElement.
    elem: DataElement | RawDataElement = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = elem.length if isinstance(elem, RawDataElement) else len(elem.value or b"")
    compressed = bool(header.transfer_syntax_uid) and UID(header.transfer_syntax_uid).is_compressed
    if compressed or length == 0xFFFFFFFF:
        value = elem.value if elem.value is not None else ds.PixelData
        try:
            fragments = parse_fragments(value)
        except Exception as exc:
            raise RejectedInstance(
                status.PIXEL_DATA_INCONSISTENT,
                f"encapsulated pixel data is malformed: {type(exc).__name__}",
                header.sop_instance_uid,
            ) from exc
        if fragments[0] == 0:
            raise RejectedInstance(
                status.PIXEL_DATA_INCONSISTENT,
                "encapsulated pixel data has no fragments",
                header.sop_instance_uid,
            )
        return
    expected = _native_length(ds, header)
    if expected is not None and length < expected:
        raise RejectedInstance(
            status.PIXEL_DATA_INCONSISTENT,
            f"pixel data has {length} bytes, header implies {expected}",
            header.sop_instance_uid,
        )


def _native_length(ds: Dataset, header: InstanceHeader) -> int | None:
    """Bytes of native pixel data the Image Pixel module implies (PS3.5 8.1.1), or None."""
    rows, cols = header.rows, header.columns
    bits = _int(ds, "BitsAllocated", required_valid=True)
    samples = _int(ds, "SamplesPerPixel", required_valid=True) or 1
    frames = header.number_of_frames or 1
    if not rows or not cols or not bits:
        return None
    if header.photometric_interpretation in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        pixels = rows * cols * 2 * frames  # two samples per pixel after 4:2:2 subsampling
        return pixels * bits // 8
    total_bits = rows * cols * samples * frames * bits
    return (total_bits + 7) // 8
