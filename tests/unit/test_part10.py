"""The received instance's Part 10 header is byte-identical to pynetdicom's own encoding."""

from __future__ import annotations

from io import BytesIO

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from node.ingest import part10

STREAM = b"\x08\x00\x16\x00UI\x1a\x00" + b"1.2.840.10008.5.1.4.1.1.2\x00"


def upstream(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """What ``Event.encoded_dataset(include_meta=True)`` gives for this request."""
    request = C_STORE()
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.DataSet = BytesIO(STREAM)
    context = build_context(sop_class, transfer_syntax)
    context.context_id = 1
    context._as_scp = context
    event = Event(
        None,  # type: ignore[arg-type]
        evt.EVT_C_STORE,
        {"request": request, "context": context.as_tuple},
    )
    return event.encoded_dataset(include_meta=True)


def ours(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """As ``StoreSCP.on_store`` does it: from the request primitive's (normalised) UIDs."""
    request = C_STORE()
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    return (
        part10.file_header(
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            transfer_syntax,
        )
        + STREAM
    )


SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
]


def test_same_bytes_as_pynetdicom_for_typical_uids() -> None:
    for ts in SYNTAXES:
        for uid in (
            "1.2.3",
            "1.2.826.0.1.3680043.8.498.1",
            "1.2.826.0.1.3680043.8.498.10203040506070809001234567890123456789",
            "2.25.1234567890123456789012345678901234567",
            "9",
            "1" * 64,
        ):
            assert ours(CTImageStorage, uid, ts) == upstream(CTImageStorage, uid, ts), (ts, uid)


_UID_TEXT = st.from_regex(r"\A(0|[1-9][0-9]{0,20})(\.(0|[1-9][0-9]{0,20})){0,12}\Z").filter(
    lambda s: len(s) <= 64
)


@settings(max_examples=300, deadline=None)
@given(
    sop_class=st.sampled_from([CTImageStorage, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4"]),
    sop_instance=_UID_TEXT | st.text(min_size=0, max_size=70),
    transfer_syntax=st.sampled_from(SYNTAXES),
)
def test_same_bytes_as_pynetdicom_for_any_uid(
    sop_class: str, sop_instance: str, transfer_syntax: str
) -> None:
    """Also for what a careless sender puts in the command and pynetdicom lets through to
    the handler: odd lengths, short values, non-conforming characters."""
    request = C_STORE()
    try:
        request.AffectedSOPInstanceUID = sop_instance
    except ValueError:
        assume(False)  # pynetdicom refuses the message before any handler sees it
    assume(request.AffectedSOPInstanceUID is not None)
    outcomes: list[object] = []
    for encode in (upstream, ours):
        try:
            outcomes.append(encode(sop_class, sop_instance, transfer_syntax))
        except Exception:  # pydicom cannot encode it: neither can we (the SCP quarantines it)
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


def test_templates_are_reused() -> None:
    part10._template.cache_clear()
    for n in range(100):
        part10.file_header(CTImageStorage, f"1.2.826.0.1.3680043.8.498.{10**9 + n}", SYNTAXES[0])
    assert part10._template.cache_info().misses == 1
