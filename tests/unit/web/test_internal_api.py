"""The node's internal HTTP API (node.web.internal) against a real running node.

DICOMweb WADO-RS is read with ``dicomweb-client`` (what workers use); result files
with plain HTTP. Instances arrive by DCMTK storescu, as in production.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from dicomweb_client import DICOMwebClient
from sqlalchemy import select

from node.db.models import AuditEvent, Instance
from node.runtime import Node
from tests.dicomgen import write_series
from tests.nodes import free_port
from tests.peers import storescu

TOKEN = "internal-api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _web_node(start_node: Callable[..., Node], token: str) -> Node:
    node = start_node(web={"enabled": True, "port": free_port()}, cluster={"token": token})
    assert node.web_url is not None
    return node


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return _web_node(start_node, TOKEN)


@pytest.fixture
def study(node: Node, tmp_path: Path) -> tuple[str, list[Instance]]:
    """Three CT instances stored by storescu; (StudyInstanceUID, their catalog rows)."""
    study_uid, files = write_series(tmp_path / "send", 3)
    result = storescu(node.settings.dicom.port, files)
    assert result.returncode == 0, result.stderr
    with node.sessions() as session:
        rows = list(session.scalars(select(Instance).order_by(Instance.instance_number)))
    assert len(rows) == 3
    return study_uid, rows


def _url(node: Node, path: str) -> str:
    assert node.web_url is not None
    return node.web_url.rstrip("/") + path


def _client(node: Node, token: str = TOKEN) -> DICOMwebClient:
    return DICOMwebClient(_url(node, "/dicomweb"), headers={"Authorization": f"Bearer {token}"})


def _parts(response: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related response, parsed by the standard library."""
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    assert message.is_multipart()
    parts = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/dicom"
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(payload)
    return parts


def test_without_a_token_configured_the_api_is_off(start_node: Callable[..., Node]) -> None:
    node = _web_node(start_node, "")
    for method, path in (
        ("GET", "/dicomweb/studies/1.2.3"),
        ("PUT", "/internal/v1/files/results/1.2.3/v1/x.npy"),
        ("GET", "/internal/v1/files/results/1.2.3/v1/x.npy"),
    ):
        response = requests.request(method, _url(node, path), headers=AUTH, timeout=30)
        assert response.status_code == 404, (method, path)
    assert not (node.store.data_dir / "results").exists()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["none", "wrong", "longer", "basic", "no-scheme"],
)
def test_requests_without_the_right_token_are_refused(node: Node, headers: dict[str, str]) -> None:
    study_uid = "1.2.826.0.1.3680043.10.1234.5"
    rel = f"results/{study_uid}/v1/refused.npy"
    assert (
        requests.get(
            _url(node, f"/dicomweb/studies/{study_uid}"), headers=headers, timeout=30
        ).status_code
        == 401
    )
    put = requests.put(
        _url(node, f"/internal/v1/files/{rel}"), data=b"x", headers=headers, timeout=30
    )
    assert put.status_code == 401
    assert not node.store.exists(rel)


def test_dicomweb_client_retrieves_study_series_and_instance(
    node: Node, study: tuple[str, list[Instance]]
) -> None:
    study_uid, rows = study
    client = _client(node)
    stored = {r.sop_instance_uid: node.store.read(r.path) for r in rows}

    datasets = client.retrieve_study(study_uid)
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [r.sop_instance_uid for r in rows]
    series_uid = str(datasets[0].SeriesInstanceUID)
    assert len(client.retrieve_series(study_uid, series_uid)) == 3

    one = rows[1]
    ds = client.retrieve_instance(
        study_uid, series_uid, one.sop_instance_uid, media_types=(("application/dicom", "*"),)
    )
    assert ds.SOPInstanceUID == one.sop_instance_uid
    assert ds.file_meta.TransferSyntaxUID == one.transfer_syntax_uid
    assert (
        ds.PixelData
        == next(d for d in datasets if d.SOPInstanceUID == one.sop_instance_uid).PixelData
    )

    # On the wire: the stored bytes exactly, one part per instance, in the catalog's order.
    response = requests.get(
        _url(node, f"/dicomweb/studies/{study_uid}"),
        headers={
            **AUTH,
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")
    assert _parts(response) == [stored[r.sop_instance_uid] for r in rows]

    # Machine reads of patient data are in the audit trail like a person's.
    with node.sessions() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "dicomweb.retrieve")
        ).all()
    assert len(events) == 4
    assert {e.study_instance_uid for e in events} == {study_uid}
    assert all(e.user_name == "cluster-token" and e.client_address for e in events)


def test_unknown_or_malformed_uids_are_not_found(
    node: Node, study: tuple[str, list[Instance]]
) -> None:
    study_uid, rows = study
    real_series = str(_client(node).retrieve_study(study_uid)[0].SeriesInstanceUID)
    for path in (
        "/dicomweb/studies/1.2.3.999",
        f"/dicomweb/studies/{study_uid}/series/1.2.3.999",
        f"/dicomweb/studies/{study_uid}/series/{real_series}/instances/1.2.3.999",
        # An instance of the study under another (wrong) series
        f"/dicomweb/studies/{study_uid}/series/1.2.3.999/instances/{rows[0].sop_instance_uid}",
        "/dicomweb/studies/not-a-uid",
        "/dicomweb/studies/1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25.26.27.28.29.30.31",
    ):
        assert requests.get(_url(node, path), headers=AUTH, timeout=30).status_code == 404, path


def test_a_specific_other_transfer_syntax_is_refused(
    node: Node, study: tuple[str, list[Instance]]
) -> None:
    study_uid, rows = study
    assert {r.transfer_syntax_uid for r in rows} == {EXPLICIT_VR_LE}
    url = _url(node, f"/dicomweb/studies/{study_uid}")

    def status(accept: str) -> int:
        return requests.get(url, headers={**AUTH, "Accept": accept}, timeout=30).status_code

    def retrievals() -> int:
        with node.sessions() as session:
            events = select(AuditEvent).where(AuditEvent.action == "dicomweb.retrieve")
            return len(session.scalars(events).all())

    assert (
        status(f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}')
        == 406
    )
    # Refused, nothing served: the audit trail does not show a retrieval.
    assert retrievals() == 0
    assert (
        status(f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_VR_LE}')
        == 200
    )
    assert (
        status(
            f'multipart/related; type="application/dicom"; transfer-syntax={JPEG_BASELINE}, '
            'multipart/related; type="application/dicom"; transfer-syntax=*'
        )
        == 200
    )
    assert status('multipart/related; type="application/dicom"') == 200
    assert status("*/*") == 200
    assert retrievals() == 4


@pytest.mark.parametrize(
    "path",
    [
        "instances/1.2.3/1.2.4/1.2.5.dcm",
        "results/%2E%2E/instances/evil.dcm",
        "results/1.2.3/%2E%2E/%2E%2E/web-secret",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "results",
        "results/.hidden",
        "results/1.2.3/..%5C..%5Cevil",
        "tmp/x.part",
    ],
)
def test_result_paths_outside_results_are_refused(node: Node, path: str) -> None:
    url = _url(node, "/internal/v1/files/") + path
    put = requests.put(url, data=b"not allowed", headers=AUTH, timeout=30)
    assert put.status_code == 400, put.status_code
    assert requests.get(url, headers=AUTH, timeout=30).status_code == 400
    written = [
        p
        for p in node.store.data_dir.rglob("*")
        if p.is_file() and p.read_bytes() == b"not allowed"
    ]
    assert written == []
    assert not (node.store.data_dir / "results").exists()


def test_result_upload_is_durable_readable_and_idempotent(node: Node) -> None:
    rel = "results/1.2.826.0.1.3680043.10.1234.77/v1/1.2.3_1.heatmap.npy"
    url = _url(node, f"/internal/v1/files/{rel}")
    body = bytes(range(256)) * 40
    for _ in range(2):
        assert requests.put(url, data=body, headers=AUTH, timeout=30).status_code == 204
        assert node.store.read(rel) == body
    assert list((node.store.data_dir / "tmp").glob("*.part")) == []
    got = requests.get(url, headers=AUTH, timeout=30)
    assert got.status_code == 200 and got.content == body
    assert requests.get(url + "x", headers=AUTH, timeout=30).status_code == 404
    # A machine reading a patient's results is in the audit trail, as for WADO-RS.
    with node.sessions() as session:
        reads = session.execute(
            select(AuditEvent.user_name, AuditEvent.study_instance_uid, AuditEvent.detail).where(
                AuditEvent.action == "result.retrieve"
            )
        ).all()
    assert [tuple(r) for r in reads] == [("cluster-token", "1.2.826.0.1.3680043.10.1234.77", rel)]
