"""Results back to PACS, end to end, with Orthanc as the PACS.

A CXR goes in with storescu; the SEG, the TID 1500 SR and the heatmap image come
out by C-STORE into Orthanc under the same study, each valid per dciodvfy.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from node.config import Destination, load_settings
from node.db.models import Export, ExportState, Finding, Study
from node.export.scu import Item, Outcome, send
from node.runtime import Node
from tests.conftest import node_config
from tests.dicomgen import cxr_from_jpeg
from tests.nodes import free_port, wait_done, write_config
from tests.peers import Orthanc, require, storescu

RULES = """
format = 1
[[rule]]
name = "chest"
priority = "routine"
models = ["pneumonia-triage", "lung-seg"]
destinations = ["PACS"]
[rule.match]
Modality = ["CR", "DX"]
BodyPartExamined = "CHEST"
"""

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def _start(destination_port: int, send_original: bool = False, **pipeline: Any) -> Node:
        rules = tmp_path / "rules.toml"
        rules.write_text(RULES)
        cfg = node_config(
            tmp_path,
            study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
            routing={"rules_file": str(rules)},
            pipeline={"workers": 1, **pipeline},
            export={
                "initial_backoff_seconds": 1.0,
                "max_backoff_seconds": 2.0,
                "timeout_seconds": 10,
            },
        )
        cfg["destinations"] = [
            {
                "name": "PACS",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": destination_port,
                "send_original": send_original,
            }
        ]
        path = write_config(tmp_path / "node.toml", cfg)
        node = Node(load_settings(path), config_path=path)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


def wait_exports(
    node: Node, study_id: int, done: Callable[[list[Export]], bool], timeout: float = 180
) -> list[Export]:
    deadline = time.monotonic() + timeout
    rows: list[Export] = []
    while time.monotonic() < deadline:
        with node.sessions() as session:
            rows = list(
                session.execute(select(Export).where(Export.study_id == study_id)).scalars()
            )
        if rows and done(rows):
            return rows
        time.sleep(0.2)
    logs = "".join(p.read_text()[-3000:] for p in (node.store.data_dir / "logs").glob("*.log"))
    raise AssertionError(
        f"exports not settled: {[(r.kind, r.state, r.last_error) for r in rows]}\n{logs}"
    )


def dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    out = subprocess.run(
        [require("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def send_cxr(node: Node, shared_data: Path, tmp_path: Path) -> str:
    jpeg = sorted((shared_data / "cxr-pneumonia" / "val" / "PNEUMONIA").glob("*.jpeg"))[3]
    uid, _ = cxr_from_jpeg(jpeg, tmp_path / "cxr.dcm")
    assert storescu(node.dicom.port, [tmp_path / "cxr.dcm"]).returncode == 0
    return uid


def test_seg_sr_and_heatmap_arrive_in_orthanc(
    start_node: Callable[..., Node], orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    """All three objects arrive under the source study, pass dciodvfy, and carry our finding."""
    node = start_node(orthanc.dicom_port)
    study_uid = send_cxr(node, shared_data, tmp_path)
    study = wait_done(node, study_uid)
    exports = wait_exports(
        node, study.id, lambda rows: all(r.state != ExportState.PENDING for r in rows)
    )
    assert sorted(r.kind for r in exports) == ["sc", "seg", "sr"]
    assert all(r.state == ExportState.DELIVERED for r in exports), [
        (r.kind, r.last_error) for r in exports
    ]

    stored = {
        str(i["SOPInstanceUID"]): i
        for i in orthanc.instances()
        if i.get("StudyInstanceUID") == study_uid
    }
    assert set(stored) == {r.sop_instance_uid for r in exports}  # all three, nothing else
    with node.sessions() as session:
        finding = session.execute(
            select(Finding).where(
                Finding.study_id == study.id,
                Finding.kind == "classification",
                Finding.sop_instance_uid.is_not(None),
            )
        ).scalar_one()
    for export in exports:
        data = orthanc.file(str(stored[export.sop_instance_uid]["id"]))
        assert dciodvfy_errors(data, tmp_path, f"{export.kind}.dcm") == [], export.kind
    sr = dcmread(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == SR and dcmread(tmp_path / "seg.dcm").SOPClassUID == SEG
    numbers = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(sr.ContentSequence)
        if getattr(item, "ValueType", "") == "NUM"
    ]
    assert any(abs(v - (finding.probability or 0)) < 1e-3 for v in numbers), numbers

    # Re-processing the same study yields the same UIDs: the PACS gets replacements of the
    # three objects (delivered again, after the first run), no fourth object.
    assert node.pipeline is not None and node.pipeline.reprocess(study_uid)
    wait_done(node, study_uid)
    again = wait_exports(
        node,
        study.id,
        lambda rows: (
            all(r.state == ExportState.DELIVERED and r.attempts >= 1 for r in rows)
            and all(r.delivered_at and r.delivered_at > study.finished_at for r in rows)
        ),
    )  # type: ignore[operator]
    assert sorted(r.sop_instance_uid for r in again) == sorted(stored)
    in_pacs = {
        str(i["SOPInstanceUID"])
        for i in orthanc.instances()
        if i.get("StudyInstanceUID") == study_uid
    }
    assert in_pacs == set(stored)

    # Re-sending the study from the modality: stored once, not analysed or exported again.
    assert storescu(node.dicom.port, [tmp_path / "cxr.dcm"]).returncode == 0
    time.sleep(3)
    with node.sessions() as session:
        assert session.execute(select(Study.version).where(Study.id == study.id)).scalar_one() == 1
        after = session.execute(
            select(Export.sop_instance_uid, Export.attempts, Export.delivered_at).where(
                Export.study_id == study.id
            )
        ).all()
    assert sorted(tuple(r) for r in after) == sorted(
        (r.sop_instance_uid, r.attempts, r.delivered_at) for r in again
    )


def test_destination_down_then_back_everything_arrives(
    start_node: Callable[..., Node], orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    """Orthanc stopped while results are produced: deliveries wait, retry, and all arrive later.

    This destination also gets the original study (a node in front of PACS).
    """
    orthanc.stop()
    node = start_node(orthanc.dicom_port, send_original=True)
    study_uid = send_cxr(node, shared_data, tmp_path)
    study = wait_done(node, study_uid)
    failing = wait_exports(node, study.id, lambda rows: all(r.attempts >= 2 for r in rows))
    assert all(r.state == ExportState.PENDING and r.last_error for r in failing)
    orthanc.start()
    delivered = wait_exports(
        node, study.id, lambda rows: all(r.state == ExportState.DELIVERED for r in rows)
    )
    assert sorted(r.kind for r in delivered) == ["original", "sc", "seg", "sr"]
    stored = {
        str(i["SOPInstanceUID"])
        for i in orthanc.instances()
        if i.get("StudyInstanceUID") == study_uid
    }
    assert stored == {r.sop_instance_uid for r in delivered}


def test_permanent_rejection_is_not_retried(
    start_node: Callable[..., Node], shared_data: Path, tmp_path: Path
) -> None:
    """A destination answering 0xA900 to everything: marked failed with the status, no retry storm."""
    port = free_port()
    attempts: list[int] = []

    def reject(event: evt.Event) -> int:
        attempts.append(1)
        return 0xA900

    ae = AE(ae_title="ORTHANC")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, reject)]
    )
    try:
        node = start_node(port)
        study = wait_done(node, send_cxr(node, shared_data, tmp_path))
        failed = wait_exports(
            node, study.id, lambda rows: all(r.state != ExportState.PENDING for r in rows)
        )
        time.sleep(4)  # several backoff periods: nothing more may be tried
        with node.sessions() as session:
            rows = list(
                session.execute(select(Export).where(Export.study_id == study.id)).scalars()
            )
        assert all(
            r.state == ExportState.FAILED and r.last_status == 0xA900 and r.attempts == 1
            for r in rows
        )
        assert len(attempts) == len(failed) == 3
    finally:
        server.shutdown()


def _walk(items: Any) -> Iterator[Any]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_originals_reach_orthanc_in_their_own_transfer_syntax(
    orthanc: Orthanc, shared_data: Path
) -> None:
    """Originals in every transfer syntax of the corpus, in one association to a PACS
    that takes them all: each is stored as it was (no decompression), same pixels."""
    files = sorted((shared_data / "dicom" / "transfer-syntaxes").glob("*.dcm"))
    items = []
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        items.append(Item(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    destination = Destination(
        name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
    )
    outcomes = send(destination, items, calling_ae_title="TRIAGE", timeout=30)
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * len(items), [
        (p.name, o.detail) for p, o in zip(files, outcomes, strict=True)
    ]
    stored = {str(i["SOPInstanceUID"]): str(i["id"]) for i in orthanc.instances()}
    # Files of the corpus share one SOP Instance UID (MR_small in several syntaxes):
    # Orthanc keeps the first one it got (OverwriteInstances is off).
    first: dict[str, Path] = {}
    for path, item in zip(files, items, strict=True):
        first.setdefault(item.sop_instance_uid, path)
    assert set(stored) == set(first)
    for uid, oid in stored.items():
        sent = dcmread(first[uid])
        kept = dcmread(BytesIO(orthanc.file(oid)))
        assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, first[uid].name
        assert np.array_equal(kept.pixel_array, sent.pixel_array), first[uid].name
