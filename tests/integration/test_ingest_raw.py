"""Ingest of the shared corpus as raw bytes: stored byte-identical, or refused and quarantined.

The raw sender puts each file's dataset bytes on the wire unchanged (a
misbehaving device would), so broken files reach the node and the stored
bytes can be compared with what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.db.models import Instance, QuarantinedInstance
from node.ingest import status
from node.runtime import Node
from tests.dicomgen import write_series
from tests.peers import echoscu, raw_store, split_part10

#: Structurally valid DICOM whose compressed codestream is defective. Ingest does not
#: decode pixels (it must answer fast); the worker finds these when it decodes.
ACCEPTED_CODESTREAM_DEFECTS = {
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "JPEGLossless_1s_1f_i_16_16_bad.dcm",
    "RG2_JPLY.dcm",
}

#: Files outside broken/ that the node refuses when their bytes arrive unchanged, with
#: the status and why. Every other file outside broken/ must be answered Success.
REFUSED_RAW = {
    # SOP Instance UID (and Study and Series Instance UID) present but empty: nothing to
    # file the instance under. DCMTK does not send it at all; the raw sender makes up a
    # UID for the request, and the node refuses the data set (type 1 attribute empty).
    "pixel-features/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm": status.MISSING_ATTRIBUTE,
}


def test_corpus_raw_bytes(
    start_node: Callable[..., Node], dicom_corpus: list[Path], shared_data: Path
) -> None:
    """Accepted: the stored dataset bytes equal the sent ones. Refused: failure status, bytes kept.

    Every file outside broken/ (and each codestream defect) is accepted except the
    listed ones; every other broken/ file is refused.
    """
    node = start_node()
    first_sent: dict[str, bytes] = {}
    refused: list[tuple[Path, int, bytes]] = []
    for path in dicom_corpus:
        sent = raw_store(node.dicom.port, path)
        assert sent.status is not None, f"{path.name}: no C-STORE response"
        rel = path.relative_to(shared_data / "dicom")
        if rel.parts[0] == "broken" and path.name not in ACCEPTED_CODESTREAM_DEFECTS:
            assert status.is_failure(sent.status), f"{rel} was accepted (0x{sent.status:04X})"
        else:
            expected = REFUSED_RAW.get(rel.as_posix(), status.SUCCESS)
            assert sent.status == expected, f"{rel}: 0x{sent.status:04X}, expected 0x{expected:04X}"
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
    assert first_sent, "nothing was accepted"
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
    broken = {
        p.relative_to(shared_data / "dicom").as_posix()
        for p in dicom_corpus
        if p.parent.name == "broken" and p.name not in ACCEPTED_CODESTREAM_DEFECTS
    }
    assert {rel.as_posix() for rel, _, _ in refused} == broken | set(REFUSED_RAW)


def test_unexpected_error_while_storing_answers_internal_error(
    start_node: Callable[..., Node], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's last resort: an unexpected exception while storing answers 0xC0FF,
    keeps the bytes in quarantine, and the listener goes on serving.

    No real fault reaches that path: disk and database errors are turned into the
    node's own errors and answered 0xA700/0xA701 before it. So the store raises a
    RuntimeError once, standing in for a bug in the SCP's own code; the sender is real.
    """
    node = start_node()
    _, (victim, other) = write_series(tmp_path / "in", 2)
    relpath = node.scp.store.instance_relpath
    calls: list[tuple[str, ...]] = []

    def fails_first_time(*uids: str) -> str:
        calls.append(uids)
        if len(calls) == 1:
            raise RuntimeError("a bug while storing")
        return relpath(*uids)

    monkeypatch.setattr(node.scp.store, "instance_relpath", fails_first_time)
    sent = raw_store(node.dicom.port, victim)
    assert sent.status == status.INTERNAL_ERROR, sent.status
    assert calls, "the fault was never reached"

    with node.sessions() as session:
        assert session.execute(select(Instance)).scalars().all() == []
        (q,) = session.execute(select(QuarantinedInstance)).scalars().all()
    assert (q.status, q.reason) == (status.INTERNAL_ERROR, "internal error")
    assert q.sop_instance_uid == sent.sop_instance_uid and q.calling_ae_title == "STORESCU"
    _meta, kept = split_part10(node.store.read(q.path))
    assert kept == sent.sent_dataset, "quarantined bytes differ from what was sent"
    sidecar = json.loads(node.store.path(q.path).with_suffix(".json").read_text())
    assert sidecar["status"] == status.INTERNAL_ERROR
    assert list(node.store.tmp_dir.iterdir()) == []  # the staged copy is gone

    # The listener is still up: a C-ECHO, another instance, and the refused one again.
    assert echoscu(node.dicom.port).returncode == 0
    for path in (other, victim):
        again = raw_store(node.dicom.port, path)
        assert again.status == status.SUCCESS, f"{path.name}: 0x{again.status or 0:04X}"
    with node.sessions() as session:
        stored = {i.sop_instance_uid for i in session.execute(select(Instance)).scalars()}
    assert stored == {sent.sop_instance_uid, str(dcmread(other).SOPInstanceUID)}
