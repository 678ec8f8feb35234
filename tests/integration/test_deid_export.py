"""De-identified delivery: an external Orthanc gets pseudonyms, the PACS gets the original.

A CT study goes in with storescu; the routing rule forwards the originals to two
Orthanc destinations, one with ``deidentify = true``. What each Orthanc stored is
read back over its REST API and as the received file's bytes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.config import Settings
from node.db.models import Export, ExportState
from node.deid import Deidentifier
from node.runtime import Node
from tests.conftest import node_config
from tests.dicomgen import Patient, write_series
from tests.nodes import free_port
from tests.peers import Orthanc, storescu

PATIENT = Patient(name="Identifiable^Isolde", patient_id="PID-DEID-31337", birth_date="19480229")
KEY = "test-pseudonym-key-0123456789abcdef"
RULES = """
format = 1
[[rule]]
name = "ct"
priority = "routine"
models = ["pneumonia-triage"]
destinations = ["EXT", "PACS"]
[rule.match]
Modality = "CT"
"""


@pytest.fixture
def orthancs(tmp_path: Path) -> Iterator[dict[str, Orthanc]]:
    started = {
        name: Orthanc(tmp_path / name, dicom_port=free_port(), http_port=free_port(), aet=name)
        for name in ("EXT", "PACS")
    }
    try:
        for o in started.values():
            o.start()
        yield started
    finally:
        for o in started.values():
            o.stop()


def _wait_delivered(node: Node, count: int, timeout: float = 120) -> list[Export]:
    deadline = time.monotonic() + timeout
    while True:
        with node.sessions() as session:
            exports = list(session.scalars(select(Export)))
        if len(exports) == count and all(e.state != ExportState.PENDING for e in exports):
            return exports
        if time.monotonic() > deadline:
            raise AssertionError(
                f"deliveries not finished: {[(e.destination, e.state) for e in exports]}"
            )
        time.sleep(0.2)


def test_deidentifying_destination_gets_no_patient_identity(
    orthancs: dict[str, Orthanc], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    destinations = [
        {
            "name": name,
            "ae_title": name,
            "host": "127.0.0.1",
            "port": o.dicom_port,
            "send_original": True,
            "deidentify": name == "EXT",
        }
        for name, o in orthancs.items()
    ]
    cfg = node_config(
        tmp_path,
        study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
        routing={"rules_file": str(rules)},
        privacy={"pseudonym_key": KEY},
        export={"initial_backoff_seconds": 1.0, "max_backoff_seconds": 2.0, "timeout_seconds": 10},
    )
    node = Node(Settings.model_validate({**cfg, "destinations": destinations}))
    node.start()
    try:
        _send_and_check(node, orthancs, tmp_path)
    finally:
        node.stop()


def _send_and_check(node: Node, orthancs: dict[str, Orthanc], tmp_path: Path) -> None:
    study_uid, files = write_series(tmp_path / "ct", 2, patient=PATIENT)
    sent = storescu(node.dicom.port, files)
    assert sent.returncode == 0, sent.stderr
    originals = {str(dcmread(f).SOPInstanceUID) for f in files}

    exports = _wait_delivered(node, count=4)
    assert {(e.destination, e.state) for e in exports} == {
        ("EXT", ExportState.DELIVERED),
        ("PACS", ExportState.DELIVERED),
    }, [e.last_error for e in exports]

    pacs = orthancs["PACS"].instances()
    assert {i["SOPInstanceUID"] for i in pacs} == originals
    assert {i["StudyInstanceUID"] for i in pacs} == {study_uid}
    for instance in pacs:
        ds = dcmread_bytes(orthancs["PACS"].file(str(instance["id"])))
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == (
            PATIENT.name,
            PATIENT.patient_id,
            "ACC0001",
        )

    pseudonyms = Deidentifier(KEY)
    external = orthancs["EXT"].instances()
    assert {i["SOPInstanceUID"] for i in external} == {pseudonyms.uid(u) for u in originals}
    assert {i["StudyInstanceUID"] for i in external} == {pseudonyms.uid(study_uid)}
    for instance in external:
        data = orthancs["EXT"].file(str(instance["id"]))
        for original in (
            PATIENT.name,
            PATIENT.patient_id,
            PATIENT.birth_date,
            "ACC0001",
            study_uid,
        ):
            assert original.encode() not in data, original
        ds = dcmread_bytes(data)
        assert ds.PatientID == pseudonyms.patient_id(PATIENT.patient_id)
        assert str(ds.PatientName) == pseudonyms.patient_name(PATIENT.name)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def dcmread_bytes(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data))
