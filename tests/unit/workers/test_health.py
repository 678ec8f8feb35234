"""The worker's /readyz: not ready while its pool processes cannot load the models."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.registry import SHIPPED_DIR
from node.config import Settings
from tests.conftest import node_config
from workers.health import MULTIPROC_ENV, WorkerHealth
from workers.inference import _load


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerHealth]:
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("pneumonia-triage", "lung-seg"):
        shutil.copy(SHIPPED_DIR / f"{name}.json", weights)
        (weights / f"{name}.weights.npz").write_bytes(b"")
    settings = Settings.model_validate(node_config(tmp_path, models={"weights_dir": weights}))
    shared = tmp_path / "metrics"
    shared.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(shared))  # as "triage-node worker" sets it
    health = WorkerHealth(object(), settings, "127.0.0.1", 0)
    health.multiprocess_dir = shared
    health.ready.set()
    yield health
    health.stop()


def _model_reasons(probes: WorkerHealth) -> list[str]:
    code, body = probes.readiness()
    assert code == 503  # no broker nor schema here either; only the model reasons matter
    return [r for r in body["reasons"] if "model" in r]


def test_a_model_that_failed_to_load_makes_the_worker_not_ready(probes: WorkerHealth) -> None:
    assert _model_reasons(probes) == []

    def broken() -> object:
        raise ValueError("lung-seg.weights.npz: sha256 does not match its metadata")

    with pytest.raises(ValueError):
        _load("lung-seg", broken)  # what a pool process's warm-up or first task does
    (reason,) = _model_reasons(probes)
    assert f"process {os.getpid()} could not load model lung-seg" in reason
    assert "sha256" in reason

    class Loaded:
        name, version = "lung-seg", "1"

    _load("lung-seg", Loaded)  # a later attempt succeeds
    assert _model_reasons(probes) == []


def test_failures_of_dead_processes_are_forgotten(probes: WorkerHealth) -> None:
    assert probes.multiprocess_dir is not None
    stale = probes.multiprocess_dir / "model-failed-999999999-lung-seg"
    stale.write_text("ValueError: old")
    assert _model_reasons(probes) == []
    assert not stale.exists()


def test_weights_gone_after_start_make_the_worker_not_ready(probes: WorkerHealth) -> None:
    folder = probes.settings.models.weights_dir
    assert folder is not None
    (folder / "pneumonia-triage.weights.npz").unlink()
    (reason,) = _model_reasons(probes)
    assert reason.startswith("models.weights_dir: ") and "pneumonia-triage.weights.npz" in reason


def test_worker_endpoints_answer_head(probes: WorkerHealth) -> None:
    """HEAD, as monitors probe: the status of GET, no body."""
    import httpx

    probes.start()
    base = f"http://127.0.0.1:{probes.bound_port}"
    get, head = httpx.get(f"{base}/readyz", timeout=10), httpx.head(f"{base}/readyz", timeout=10)
    assert head.status_code == get.status_code == 503 and head.content == b""
    assert httpx.head(f"{base}/healthz", timeout=10).status_code == probes.liveness()[0]
