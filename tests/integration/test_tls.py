"""Transport security against real peers: DCMTK over DICOM TLS, Orthanc as a TLS PACS, HTTPS.

Certificates come from throw-away ``trustme`` CAs: one the node trusts and a rogue
one it does not. Private keys are written owner-only (0600), as the node demands.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from fastapi.testclient import TestClient

from node.config import Destination, Settings
from node.db.models import Role
from node.export.scu import Item, Outcome, send
from node.runtime import Node
from node.tls import TlsError
from node.users.accounts import Accounts
from node.web.app import create_app
from tests.conftest import node_config
from tests.dicomgen import write_series
from tests.nodes import free_port
from tests.peers import Orthanc, dcmtk_env, require


@dataclass(frozen=True)
class Pki:
    ca: Path
    rogue_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _leaf(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    pem, key = directory / f"{name}.pem", directory / f"{name}.key"
    pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return pem, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    rogue.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    server = _leaf(ca.issue_cert("127.0.0.1", "localhost"), d, "server")
    client = _leaf(ca.issue_cert("modality.example", common_name="CT1"), d, "client")
    rogue_client = _leaf(rogue.issue_cert("intruder.example"), d, "rogue-client")
    return Pki(d / "ca.pem", d / "rogue-ca.pem", *server, *client, *rogue_client)


def dcmtk(
    tool: str, port: int, tls: list[str], *files: Path, aet: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK SCU (``echoscu``/``storescu``) with TLS options against the node."""
    return subprocess.run(
        [require(tool), "-aet", aet, "-aec", "TRIAGE", *tls, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=120,
        check=False,
    )


def anonymous(ca: Path) -> list[str]:
    """TLS without a client certificate, verifying the server against ``ca``."""
    return ["+tla", "+cf", str(ca)]


def with_cert(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


def dicom_tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "port": free_port(),
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca),
        **extra,
    }


def test_tls_listener_beside_plain(
    start_node: Callable[..., Node], pki: Pki, tmp_path: Path
) -> None:
    node = start_node(dicom={"tls": dicom_tls(pki)})
    port = node.dicom.tls_port
    assert port is not None and port != node.dicom.port

    # A caller that connects and never speaks holds only its own thread, not the listener.
    with socket.create_connection(("127.0.0.1", port), timeout=60):
        echo = dcmtk("echoscu", port, anonymous(pki.ca))
    assert echo.returncode == 0, echo.stderr
    _, files = write_series(tmp_path / "ct", 2)
    store = dcmtk(
        "storescu", port, with_cert(pki.client_key, pki.client_cert, pki.ca), *files, aet="STORESCU"
    )
    assert store.returncode == 0, store.stderr
    assert node.catalog.has_instance(str(_sop_uid(files[0])))
    assert node.catalog.has_instance(str(_sop_uid(files[1])))

    # The plain listener still answers; plain DICOM on the TLS port does not.
    assert dcmtk("echoscu", node.dicom.port, []).returncode == 0
    assert dcmtk("echoscu", port, []).returncode != 0
    # A caller that cannot verify our certificate gives up; a client certificate
    # from an unknown CA is refused even when client certificates are optional.
    assert dcmtk("echoscu", port, anonymous(pki.rogue_ca)).returncode != 0
    rogue = with_cert(pki.rogue_client_key, pki.rogue_client_cert, pki.ca)
    assert dcmtk("echoscu", port, rogue).returncode != 0
    # The listener is still healthy after the refusals.
    assert dcmtk("echoscu", port, anonymous(pki.ca)).returncode == 0


def test_mutual_tls_only(start_node: Callable[..., Node], pki: Pki) -> None:
    node = start_node(
        dicom={
            "plain": False,
            "tls": dicom_tls(pki, require_client_certificate=True, minimum_version="TLSv1.3"),
        }
    )
    port = node.dicom.tls_port
    assert port is not None
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", node.dicom.port)) != 0, "a plain listener is open"

    assert dcmtk("echoscu", port, anonymous(pki.ca)).returncode != 0
    rogue = with_cert(pki.rogue_client_key, pki.rogue_client_cert, pki.ca)
    assert dcmtk("echoscu", port, rogue).returncode != 0
    echo = dcmtk("echoscu", port, with_cert(pki.client_key, pki.client_cert, pki.ca))
    assert echo.returncode == 0, echo.stderr

    # minimum_version TLSv1.3: a client that speaks at most TLS 1.2 is refused.
    def handshake(maximum: ssl.TLSVersion) -> str | None:
        context = ssl.create_default_context(cafile=pki.ca)
        context.maximum_version = maximum
        context.load_cert_chain(pki.client_cert, pki.client_key)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            return tls.version()

    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)
    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_certificate_problems_stop_the_start(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server_key.read_bytes())
    loose.chmod(0o644)
    cases = {
        "readable by group or others": {"private_key": str(loose)},
        "cannot read certificate": {"certificate": str(tmp_path / "missing.pem")},
        "cannot be used": {"certificate": str(pki.client_cert)},  # not the key's certificate
        "CA certificates": {"ca_certificates": str(pki.server_key)},
    }
    for expected, override in cases.items():
        settings = Settings.model_validate(
            node_config(
                tmp_path / expected.replace(" ", "-"), dicom={"tls": dicom_tls(pki, **override)}
            )
        )
        node = Node(settings, pipeline=False)
        try:
            with pytest.raises(TlsError, match=expected) as info:
                node.start()
            assert "dicom.tls" in str(info.value)
        finally:
            node.dicom.stop()
            node.engine.dispose()


def test_listener_settings_refused(tmp_path: Path) -> None:
    from node.config import load_settings
    from node.errors import ConfigError

    cases = {
        "plain = false needs dicom.tls.enabled": "[dicom]\nplain = false\n",
        "must differ": "[dicom]\nport = 2762\n[dicom.tls]\nenabled = true\n"
        'certificate = "a.pem"\nprivate_key = "a.key"\n',
    }
    for expected, text in cases.items():
        path = tmp_path / "node.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            load_settings(path)


def test_export_over_tls_to_orthanc(pki: Pki, tmp_path: Path) -> None:
    """Orthanc's DICOM TLS requires our client certificate (mutual TLS)."""
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port())
    config = json.loads(orthanc.config.read_text())
    config.update(
        {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server_cert),
            "DicomTlsPrivateKey": str(pki.server_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        }
    )
    orthanc.config.write_text(json.dumps(config))
    orthanc.start()
    try:
        _, files = write_series(tmp_path / "ct", 1)
        item = Item(files[0], str(_sop_class(files[0])), str(_sop_uid(files[0])))

        def deliver(**tls: Any) -> tuple[Outcome, str]:
            destination = Destination(
                name="pacs",
                ae_title="ORTHANC",
                host="127.0.0.1",
                port=orthanc.dicom_port,
                tls={key: str(value) for key, value in tls.items()},
            )
            (result,) = send(destination, [item], calling_ae_title="TRIAGE", timeout=60)
            return result.outcome, result.detail

        outcome, detail = deliver(
            ca_certificates=pki.rogue_ca, certificate=pki.client_cert, private_key=pki.client_key
        )
        assert outcome is Outcome.TEMPORARY
        assert "certificate verify failed" in detail, detail
        outcome, detail = deliver(ca_certificates=pki.ca)  # no client certificate
        assert outcome is Outcome.TEMPORARY, detail
        assert "certificate required" in detail, detail
        assert orthanc.instances() == []

        outcome, detail = deliver(
            ca_certificates=pki.ca, certificate=pki.client_cert, private_key=pki.client_key
        )
        assert outcome is Outcome.DELIVERED, detail
        assert [i["SOPInstanceUID"] for i in orthanc.instances()] == [item.sop_instance_uid]
    finally:
        orthanc.stop()


def test_https_web(start_node: Callable[..., Node], pki: Pki) -> None:
    node = start_node(
        web={
            "enabled": True,
            "tls_certificate": str(pki.server_cert),
            "tls_private_key": str(pki.server_key),
        }
    )
    Accounts(node.sessions).add("rad", "a-long-password", Role.RADIOLOGIST)
    url = node.web_url
    assert url is not None and url.startswith("https://")
    verify = ssl.create_default_context(cafile=pki.ca)
    with httpx.Client(base_url=url, verify=verify, timeout=60) as client:
        r = client.post("/api/session", json={"name": "rad", "password": "a-long-password"})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "; secure" in cookie, cookie
        assert client.get("/api/session").json()["name"] == "rad"
    with pytest.raises(httpx.TransportError):
        httpx.get(url.replace("https://", "http://") + "api/session", timeout=60)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, verify=ssl.create_default_context(cafile=pki.rogue_ca), timeout=60)


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _sop_class(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPClassUID)


def test_admin_echo_reaches_a_tls_only_destination(pki: Pki, tmp_path: Path) -> None:
    """The C-ECHO button uses the destination's tls, as its exports do (here: the node itself)."""
    listener = dicom_tls(pki)
    pacs = {"name": "PACS", "ae_title": "TRIAGE", "host": "127.0.0.1", "port": listener["port"]}
    config = node_config(tmp_path, dicom={"plain": False, "tls": listener})
    config["destinations"] = [
        {**pacs, "tls": {"ca_certificates": str(pki.ca)}},
        {**pacs, "name": "PLAIN"},
        {**pacs, "name": "ROGUE", "tls": {"ca_certificates": str(pki.rogue_ca)}},
    ]
    node = Node(Settings.model_validate(config))
    node.start()
    try:
        Accounts(node.sessions).add("admin", "a-long-password", Role.ADMIN)
        with TestClient(create_app(node)) as client:
            r = client.post("/api/session", json={"name": "admin", "password": "a-long-password"})
            assert r.status_code == 200, r.text
            client.headers["X-CSRF-Token"] = r.json()["csrf_token"]

            def echo(name: str) -> dict[str, Any]:
                r = client.post(f"/api/destinations/{name}/echo")
                assert r.status_code == 200, r.text
                body: dict[str, Any] = r.json()
                return body

            assert echo("PACS") == {"ok": True, "detail": "C-ECHO success"}
            assert echo("PLAIN")["ok"] is False  # plain DICOM to the TLS port
            rogue = echo("ROGUE")
    finally:
        node.stop()
    assert rogue["ok"] is False and "certificate verify failed" in rogue["detail"], rogue
