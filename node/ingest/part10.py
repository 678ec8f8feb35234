"""The Part 10 file a received C-STORE data set is kept as, built without re-encoding per instance.

pynetdicom's ``Event.encoded_dataset(include_meta=True)`` encodes the File Meta
Information (PS3.10 7.1) through pydicom's generic writer for every instance:
0.4 ms of the ingest thread's CPU per image, a tenth of what the node spends
on a CT slice. The meta of two instances with the same SOP Class, transfer
syntax and SOP Instance UID length differ only in that UID's bytes, so the
encoding is done once per such triple (by pynetdicom and pydicom, as before)
and each instance's UID is written into a copy. The bytes are identical to
``encoded_dataset``'s; ``tests/unit/test_part10.py`` holds them to that.
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

#: The 128-byte preamble and the "DICM" prefix (PS3.10 7.1).
_PREFIX = b"\x00" * 128 + b"DICM"


def _placeholder(length: int) -> bytes:
    """A UID-shaped stand-in of ``length`` characters, unlikely inside other UIDs."""
    return (b"1" + b"9" * (length - 1))[:length]


@lru_cache(maxsize=512)
def _template(sop_class: str, transfer_syntax: str, uid_length: int) -> tuple[bytes, int] | None:
    """Encoded preamble + meta for a placeholder instance UID, and where that UID sits.

    None if the placeholder is not found exactly once (a short UID whose digits
    also occur in the other UIDs): then each instance is encoded in full.
    """
    placeholder = _placeholder(uid_length)
    encoded = _PREFIX + _encode(sop_class, placeholder.decode(), transfer_syntax)
    at = encoded.find(placeholder)
    if at < 0 or encoded.find(placeholder, at + 1) >= 0:
        return None
    return encoded, at


def _encode(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    return encode_file_meta(
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(transfer_syntax),
        )
    )


def file_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information, as ``Event.encoded_dataset`` writes them."""
    template = (
        _template(sop_class, transfer_syntax, len(sop_instance))
        if sop_instance and sop_instance.isascii()
        else None
    )
    if template is None:
        return _PREFIX + _encode(sop_class, sop_instance, transfer_syntax)
    encoded, at = template
    raw = sop_instance.encode("ascii")
    return b"".join((encoded[:at], raw, encoded[at + len(raw) :]))
