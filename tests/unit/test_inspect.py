"""Header inspection of received datasets: what is filed, what is refused and with which status."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from node.errors import RejectedInstance
from node.ingest import status
from node.ingest.inspect import inspect_instance, is_valid_uid
from tests.dicomgen import TEST_ROOT, ct_instance


def encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def ct() -> Dataset:
    return ct_instance(generate_uid(prefix=TEST_ROOT), generate_uid(prefix=TEST_ROOT), 1)


def inspect(data: bytes, ds: Dataset) -> object:
    return inspect_instance(
        data, requested_sop_class_uid=CTImageStorage, requested_sop_instance_uid=ds.SOPInstanceUID
    )


def test_valid_instance_yields_catalogue_attributes(ct: Dataset) -> None:
    header = inspect_instance(
        encode(ct),
        requested_sop_class_uid=CTImageStorage,
        requested_sop_instance_uid=ct.SOPInstanceUID,
    )
    assert header.study_instance_uid == ct.StudyInstanceUID
    assert header.modality == "CT"
    assert header.accession_number == "ACC0001"
    assert (header.rows, header.columns) == (64, 64)
    assert header.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_sop_class_mismatch_is_A900(ct: Dataset) -> None:
    with pytest.raises(RejectedInstance) as info:
        inspect_instance(
            encode(ct),
            requested_sop_class_uid=MRImageStorage,
            requested_sop_instance_uid=ct.SOPInstanceUID,
        )
    assert info.value.status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS == 0xA900


def test_sop_instance_mismatch_is_refused(ct: Dataset) -> None:
    with pytest.raises(RejectedInstance) as info:
        inspect_instance(
            encode(ct), requested_sop_class_uid=CTImageStorage, requested_sop_instance_uid="1.2.3"
        )
    assert info.value.status == status.SOP_INSTANCE_MISMATCH
    assert status.is_failure(info.value.status)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused(ct: Dataset, keyword: str) -> None:
    delattr(ct, keyword)
    with pytest.raises(RejectedInstance) as info:
        inspect(encode(ct), ct)
    assert info.value.status == status.MISSING_ATTRIBUTE


def test_malformed_uid_is_refused(ct: Dataset) -> None:
    ct.StudyInstanceUID = "1.2.03.abc"
    with pytest.raises(RejectedInstance) as info:
        inspect(encode(ct), ct)
    assert info.value.status == status.INVALID_UID


def test_short_native_pixel_data_is_refused(ct: Dataset) -> None:
    ct.PixelData = ct.PixelData[:-100]
    with pytest.raises(RejectedInstance) as info:
        inspect(encode(ct), ct)
    assert info.value.status == status.PIXEL_DATA_INCONSISTENT


def test_truncated_stream_is_refused(ct: Dataset) -> None:
    data = encode(ct)
    with pytest.raises(RejectedInstance) as info:
        inspect(data[:-500], ct)
    assert info.value.status == status.CANNOT_PARSE
    assert "truncated" in info.value.reason


def test_item_tag_outside_a_sequence_is_refused(ct: Dataset) -> None:
    """What a sequence whose length is too short leaves behind: its items at the top level.
    pydicom reads them as elements whose values cannot be converted later (found by
    tests/faults/test_fuzz.py)."""
    item = b"\xfe\xff\x00\xe0" + (10).to_bytes(4, "little") + b"\x08\x00\x50\x11UI\x02\x001\x00"
    with pytest.raises(RejectedInstance) as info:
        inspect(encode(ct) + item, ct)
    assert info.value.status == status.CANNOT_PARSE
    assert "outside a sequence" in info.value.reason


def test_binary_value_of_impossible_length_is_refused(ct: Dataset) -> None:
    """BitsStored sent as UL with 2 bytes: nothing can decode it (found by the fuzz test)."""
    data = encode(ct)
    element = b"\x28\x00\x01\x01US\x02\x00"  # (0028,0101) US, 2 bytes
    assert data.count(element) == 1
    with pytest.raises(RejectedInstance) as info:
        inspect(data.replace(element, b"\x28\x00\x01\x01UL\x02\x00"), ct)
    assert info.value.status == status.CANNOT_PARSE
    assert "not a multiple of 4" in info.value.reason


def test_garbage_is_refused() -> None:
    with pytest.raises(RejectedInstance) as info:
        inspect_instance(
            b"\x00" * 128 + b"DICM" + b"\xff" * 300,
            requested_sop_class_uid="1.2",
            requested_sop_instance_uid="1.2",
        )
    assert status.is_failure(info.value.status)


def test_invalid_integer_string_in_image_module_is_refused(ct: Dataset) -> None:
    ct.NumberOfFrames = 1
    # pydicom will not write a bad IS, so patch the encoded value ("1 " -> "1A").
    element = b"\x28\x00\x08\x00IS\x02\x00"
    data = encode(ct).replace(element + b"1 ", element + b"1A")
    assert element + b"1A" in data
    with pytest.raises(RejectedInstance):
        inspect(data, ct)


def test_integer_strings_beyond_32_bits(ct: Dataset) -> None:
    """IS holds -2**31..2**31-1 (PS3.5 6.2), as do the catalogue's columns: a larger
    InstanceNumber is left out; a larger NumberOfFrames refuses the instance."""
    ct.InstanceNumber = 1
    ct.NumberOfFrames = 1
    number, frames = b"\x20\x00\x13\x00IS", b"\x28\x00\x08\x00IS"
    data = encode(ct).replace(number + b"\x02\x001 ", number + b"\x0c\x0099999999999 ")
    assert number + b"\x0c\x0099999999999 " in data

    header = inspect_instance(
        data, requested_sop_class_uid=CTImageStorage, requested_sop_instance_uid=ct.SOPInstanceUID
    )
    assert header.instance_number is None and header.number_of_frames == 1

    huge = data.replace(frames + b"\x02\x001 ", frames + b"\x0c\x0099999999999 ")
    assert frames + b"\x0c\x0099999999999 " in huge
    with pytest.raises(RejectedInstance) as info:
        inspect(huge, ct)
    assert info.value.status == status.CANNOT_UNDERSTAND


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.1.2", True),
        ("0.1", True),
        ("1.02", False),
        ("1..2", False),
        ("", False),
        ("1." + "2" * 63, False),
        ("1.2.a", False),
    ],
)
def test_uid_syntax(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


@pytest.mark.parametrize(
    "written,declared",
    [
        (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
        (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
    ],
)
def test_data_set_in_another_transfer_syntax_than_declared_is_refused(
    ct: Dataset, written: str, declared: str
) -> None:
    """pydicom would read it anyway; the node must not keep bytes its file meta misdescribes."""
    ct.file_meta.TransferSyntaxUID = written
    data = encode(ct)
    body = data[144 + int.from_bytes(data[140:144], "little") :]
    meta = FileMetaDataset(ct.file_meta)
    meta.TransferSyntaxUID = declared
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    with pytest.raises(RejectedInstance) as info:
        inspect(buf.getvalue() + body, ct)
    assert info.value.status == status.CANNOT_PARSE
    assert "transfer syntax" in info.value.reason
