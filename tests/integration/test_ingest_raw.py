"""Ingest of the shared corpus as raw bytes: stored byte-identical, or refused and quarantined.

The raw sender puts each file's dataset bytes on the wire unchanged (a
misbehaving device would), so broken files reach the node and the stored
bytes can be compared with what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from node.db.models import Instance, QuarantinedInstance
from node.ingest import status
from node.runtime import Node
from tests.peers import raw_store, split_part10

#: Structurally valid DICOM whose compressed codestream is defective. Ingest does not
#: decode pixels (it must answer fast); the worker finds these when it decodes.
ACCEPTED_CODESTREAM_DEFECTS = {
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "JPEGLossless_1s_1f_i_16_16_bad.dcm",
    "RG2_JPLY.dcm",
}


def test_corpus_raw_bytes(
    start_node: Callable[..., Node], dicom_corpus: list[Path], shared_data: Path
) -> None:
    """Accepted: the stored dataset bytes equal the sent ones. Refused: failure status, bytes kept."""
    node = start_node()
    first_sent: dict[str, bytes] = {}
    refused: list[tuple[Path, int, bytes]] = []
    for path in dicom_corpus:
        sent = raw_store(node.dicom.port, path)
        assert sent.status is not None, f"{path.name}: no C-STORE response"
        rel = path.relative_to(shared_data / "dicom")
        if rel.parts[0] == "broken" and path.name not in ACCEPTED_CODESTREAM_DEFECTS:
            assert status.is_failure(sent.status), f"{rel} was accepted (0x{sent.status:04X})"
        if sent.status == status.SUCCESS:
            first_sent.setdefault(sent.sop_instance_uid, sent.sent_dataset)
        else:
            assert status.is_failure(sent.status), f"{rel}: 0x{sent.status:04X}"
            refused.append((rel, sent.status, sent.sent_dataset))

    with node.sessions() as session:
        rows = {i.sop_instance_uid: i for i in session.execute(select(Instance)).scalars()}
        quarantined = (
            session.execute(select(QuarantinedInstance).order_by(QuarantinedInstance.id))
            .scalars()
            .all()
        )
    assert set(rows) == set(first_sent)
    for uid, sent_bytes in first_sent.items():
        _meta, stored_bytes = split_part10(node.store.read(rows[uid].path))
        assert stored_bytes == sent_bytes, f"{uid} not stored byte-identical"

    assert len(quarantined) == len(refused)
    for q, (rel, code, sent_bytes) in zip(quarantined, refused, strict=True):
        assert q.status == code and q.reason
        _meta, kept = split_part10(node.store.read(q.path))
        assert kept == sent_bytes, f"quarantined bytes of {rel} differ from what was sent"
        sidecar = json.loads(node.store.path(q.path).with_suffix(".json").read_text())
        assert sidecar["status"] == code and sidecar["reason"] == q.reason
    assert len(refused) >= 10
