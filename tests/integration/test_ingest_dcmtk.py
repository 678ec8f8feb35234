"""Ingest over the wire with DCMTK as the modality: echo, callers, the shared corpus, limits.

Each test states what it proves. DCMTK re-encodes what it sends, so byte
identity is checked with the raw sender in test_ingest_raw.py; here we check
statuses, the catalogue and that the pixel data arrived unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.db.models import Instance, QuarantinedInstance, Study, StudyStatus
from node.runtime import Node
from tests.dicomgen import write_series
from tests.peers import dcmsend, echoscu, storescu, storescu_responses

#: Files DCMTK still reads and sends that the node must refuse, with the status and why.
REFUSED_BY_NODE = {
    "broken/badVR.dcm": 0xC000,  # NumberOfFrames "1A" is not an integer string
    "broken/bad_sequence.dcm": 0xC003,  # SOP Instance UID is a hex digest, not a UID
    # Every element is VR UN; DCMTK puts "31" in the request's Affected SOP Class/Instance
    # UID while the dataset (VR looked up in the dictionary) says CT Image Storage.
    "pixel-features/explicit_VR-UN.dcm": 0xA900,
}


def test_echo_and_unknown_caller(start_node: Callable[..., Node]) -> None:
    """Known callers are served; an unknown calling AE title is rejected at association."""
    node = start_node()
    assert echoscu(node.dicom.port).returncode == 0
    refused = echoscu(node.dicom.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_caller_restricted_to_another_network_is_refused(start_node: Callable[..., Node]) -> None:
    """An AE title allowed only from 10.0.0.0/8 is refused when it calls from loopback."""
    node = start_node(dicom={"allowed_callers": ["STORESCU@10.0.0.0/8", "ECHOSCU@127.0.0.1"]})
    assert echoscu(node.dicom.port).returncode == 0
    refused = echoscu(node.dicom.port, aet="STORESCU")
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_shared_corpus_with_dcmsend(
    start_node: Callable[..., Node], database_url: str, dicom_corpus: list[Path], shared_data: Path
) -> None:
    """Every file DCMTK sends gets the right status; what is accepted is catalogued with its pixels intact."""
    node = start_node(database_url)
    reports = dcmsend(node.dicom.port, dicom_corpus)
    assert len(reports) >= 50  # files DCMTK cannot read at all are left out of its report
    sent = [r for r in reports if r.code is not None]
    assert len(sent) >= 45, "DCMTK should send most of the corpus"
    base = shared_data / "dicom"
    accepted: dict[str, Path] = {}
    for r in sent:
        rel = r.filename.relative_to(base).as_posix()
        expected = REFUSED_BY_NODE.get(rel, 0x0000)
        assert r.code == expected, f"{rel}: status {r.status}, expected 0x{expected:04X}"
        if expected == 0:
            # Several corpus files share a SOP Instance UID: the first one sent is kept.
            accepted.setdefault(str(dcmread(r.filename, force=True).SOPInstanceUID), r.filename)
    with node.sessions() as session:
        rows = {i.sop_instance_uid: i for i in session.execute(select(Instance)).scalars()}
        quarantined = session.execute(select(QuarantinedInstance)).scalars().all()
    assert set(rows) == set(accepted)
    for uid, source in accepted.items():
        stored = dcmread(node.store.path(rows[uid].path))
        original = dcmread(source)
        assert stored.SOPInstanceUID == uid
        if "PixelData" in original and rows[uid].transfer_syntax_uid == str(
            original.file_meta.TransferSyntaxUID
        ):
            assert stored.PixelData == original.PixelData, f"pixel data changed for {source.name}"
    assert sorted(q.status for q in quarantined) == sorted(REFUSED_BY_NODE.values())
    for q in quarantined:
        assert node.store.exists(q.path) and q.reason
    assert list(node.store.tmp_dir.iterdir()) == []  # nothing staged is left behind


def test_duplicate_sends_are_stored_once(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """The same SOP Instance sent twice is acknowledged twice and stored once."""
    node = start_node()
    _, files = write_series(tmp_path / "in", 3)
    for _ in range(2):
        result = storescu(node.dicom.port, files)
        assert [s for _, s in storescu_responses(result.stdout + result.stderr)] == ["Success"] * 3
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
        assert session.scalars(select(Instance.duplicate_count)).all() == [1, 1, 1]
        assert session.scalar(select(Study.instance_count)) == 3
    assert len(list((node.store.data_dir / "instances").rglob("*.dcm"))) == 3
    assert list(node.store.tmp_dir.iterdir()) == []  # the duplicates' staged bytes are gone


def test_full_disk_answers_out_of_resources_and_writes_nothing(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """Below min_free_bytes the answer is 0xA700 and no file or row is left behind."""
    node = start_node(storage={"min_free_bytes": 1 << 60})
    _, files = write_series(tmp_path / "in", 2)
    result = storescu(node.dicom.port, files)
    statuses = [s for _, s in storescu_responses(result.stdout + result.stderr)]
    assert statuses == ["Refused: OutOfResources"] * 2, result.stdout + result.stderr
    assert list((node.store.data_dir / "instances").rglob("*")) == []
    assert list(node.store.tmp_dir.iterdir()) == []
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0


def test_quiet_time_completes_and_late_instance_reopens(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """No instance for quiet_seconds completes a study; a later one re-opens it as version 2.

    Completion hands the study straight to routing: this CT matches no chest rule,
    so a completed version shows as not routed, with its completion time.
    """
    node = start_node(study={"quiet_seconds": 1.0, "check_interval_seconds": 0.1})
    settled = {StudyStatus.COMPLETE, StudyStatus.NOT_ROUTED}
    study_uid, files = write_series(tmp_path / "a", 2)
    storescu(node.dicom.port, files)

    def study() -> Study:
        with node.sessions() as session:
            return session.execute(select(Study)).scalar_one()

    assert study().status == StudyStatus.RECEIVING
    deadline = time.monotonic() + 10
    while study().status not in settled and time.monotonic() < deadline:
        time.sleep(0.1)
    first = study()
    assert first.status in settled and first.completed_at is not None
    assert (first.version, first.instance_count) == (1, 2)

    _, late = write_series(tmp_path / "b", 1, study_uid=study_uid, start=3)
    storescu(node.dicom.port, late)
    reopened = study()
    assert (reopened.status, reopened.version, reopened.instance_count) == (
        StudyStatus.RECEIVING,
        2,
        3,
    )
    deadline = time.monotonic() + 10
    while study().status not in settled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert study().status in settled and study().version == 2


@pytest.mark.parametrize("level", ["DEBUG"])
def test_no_phi_in_logs(
    start_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture, level: str
) -> None:
    """A whole ingest, accepted, duplicate and refused, logs no patient name, ID or birth date."""
    from pydicom.uid import generate_uid

    from tests.dicomgen import TEST_ROOT, Patient

    patient = Patient()
    caplog.set_level(level)
    node = start_node(study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1})
    _, files = write_series(tmp_path / "in", 3, patient=patient)
    storescu(node.dicom.port, files)
    storescu(node.dicom.port, files[:1])  # duplicate
    # A refused one, carrying the same patient: a new instance (not a duplicate) whose
    # Number of Frames is not an integer string. The invalid value is the patient ID, so a
    # refusal reason that quoted the offending value would put PHI in the log.
    bad = dcmread(files[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid(TEST_ROOT)
    bad.add_new(0x00280008, "SH", patient.patient_id)  # IS cannot hold it; same bytes
    bad.save_as(tmp_path / "bad.dcm")
    refused = storescu(node.dicom.port, [tmp_path / "bad.dcm"])
    answers = storescu_responses(refused.stdout + refused.stderr)
    assert answers == [(tmp_path / "bad.dcm", "Error: CannotUnderstand")], answers
    time.sleep(1.0)  # let completion run and log
    text = caplog.text
    assert "stored" in text or "study complete" in text  # the log did capture the run
    assert "rejected sop_instance_uid=" in text  # and the refusal was logged
    for value in (patient.name, patient.name.split("^")[0], patient.patient_id, patient.birth_date):
        assert value not in text, f"PHI value {value!r} appeared in the log"
