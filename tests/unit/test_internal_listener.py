"""The internal API (WADO-RS, result upload) answers on cluster.internal_port only.

The user-facing port (web.port of the web role, or of an all-in-one node with an
internal port) serves the pages and the REST API: a result upload sent there is not
taken, with or without the cluster token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from node.config import Settings
from node.runtime import Node
from tests.conftest import node_config
from tests.nodes import free_port

TOKEN = "internal-listener-test-token-0123456789"  # pragma: allowlist secret
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESULT = "results/1.2.3/seg/x.dcm"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """``nodes(role, **sections)``: started nodes with the web app and the cluster token."""
    with contextlib.ExitStack() as running:

        def _start(role: str = "all", **sections: object) -> Node:
            cfg = node_config(tmp_path / f"{role}-{free_port()}", **sections)  # type: ignore[arg-type]
            cfg["web"] = {"enabled": True, "port": free_port()}
            cfg["cluster"] = {"token": TOKEN, **cfg.get("cluster", {})}
            settings = Settings.model_validate(cfg)
            return running.enter_context(Node(settings, role=role, pipeline=False))  # type: ignore[arg-type]

        yield _start


def _put(base: str, token: bool = True) -> httpx.Response:
    return httpx.put(
        f"{base}internal/v1/files/{RESULT}",
        content=b"DICM",
        headers=AUTH if token else {},
        timeout=30,
    )


def test_web_role_serves_no_internal_api(nodes: Callable[..., Node]) -> None:
    web = nodes("web")
    assert web.web_url is not None and web.internal_url is None
    assert _put(web.web_url).status_code in (404, 405)
    assert httpx.get(f"{web.web_url}dicomweb/studies/1.2.3", headers=AUTH).status_code == 404
    assert not web.store.exists(RESULT)


def test_all_in_one_with_an_internal_port_keeps_it_off_the_web_port(
    nodes: Callable[..., Node],
) -> None:
    node = nodes("all", cluster={"internal_port": free_port()})
    assert node.web_url is not None and node.internal_url is not None
    assert node.internal_url != node.web_url
    assert _put(node.web_url).status_code in (404, 405)
    assert not node.store.exists(RESULT)
    # The internal listener: authentication as before, then the upload is taken.
    assert _put(node.internal_url, token=False).status_code == 401
    assert _put(node.internal_url).status_code == 204
    assert node.store.exists(RESULT)
    # The user-facing port still serves people and probes.
    assert httpx.get(node.web_url + "readyz", timeout=30).status_code == 200
    assert httpx.get(node.web_url + "login", timeout=30).status_code == 200


def test_dicom_role_moves_the_internal_api_to_its_port(nodes: Callable[..., Node]) -> None:
    node = nodes("dicom", cluster={"internal_port": free_port()})
    assert node.web_url is not None and node.internal_url is not None
    assert _put(node.web_url).status_code == 404
    assert httpx.get(node.web_url + "readyz", timeout=30).status_code == 200
    assert _put(node.internal_url).status_code == 204
    assert node.components()["internal_http"] is True


def test_internal_port_must_differ_from_the_others(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    cfg["cluster"] = {"internal_port": cfg["web"]["port"]}
    cfg["web"]["enabled"] = True
    with pytest.raises(ValueError, match="internal_port"):
        Settings.model_validate(cfg)


def test_start_banner_names_the_internal_listener(
    nodes: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator sees where the internal API listens, and the dicom role's web port
    is not described as serving it any more."""
    from rich.console import Console

    from node import cli

    node = nodes("dicom", cluster={"internal_port": free_port()})
    out = Console(width=200, record=True)
    monkeypatch.setattr(cli, "console", out)
    cli._show_running(node.settings, node)
    text = out.export_text()
    assert f"Internal API  {node.internal_url}" in text
    assert "internal API listener" in text and "internal_http" not in text
    assert "HTTP service (health, metrics)," in text


def test_a_worker_reads_back_a_result_and_learns_when_one_is_gone(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    """An earlier version's report is read back through the internal API; one that
    retention removed is FileNotFoundError (the new report stands alone), not a node
    outage that would retry the study."""
    from workers.storage import DicomwebStorage, InstanceCache

    node = nodes("dicom", cluster={"internal_port": free_port()})
    assert node.internal_url is not None
    storage = DicomwebStorage(
        node.internal_url.rstrip("/"), TOKEN, InstanceCache(tmp_path / "cache", 1 << 20)
    )
    storage.write_result(RESULT, b"DICM-report")
    assert storage.read_result(RESULT) == b"DICM-report"
    with pytest.raises(FileNotFoundError):
        storage.read_result("results/1.2.3/sr/gone.dcm")
