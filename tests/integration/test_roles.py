"""Production roles as separate processes: ``serve --role dicom``, ``serve --role web``, a worker.

One fresh PostgreSQL database and one private Redis server (a ``redis-server`` of
the test's own, on a free port) are shared by the three processes, as on a site
with separate hosts. The DICOM role takes storescu and serves no pages; the web
role opens no DICOM port and shows the study through the REST API; the worker
runs the models. Each process answers /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import node_config
from tests.dicomgen import Patient, cxr_from_jpeg
from tests.nodes import CLI, free_port, postgres_database, wait_for_port, write_config
from tests.peers import storescu

pytestmark = pytest.mark.postgres

TIMEOUT = 300.0  # generous: TensorFlow loads on a shared, busy machine


def poll(
    what: str, check: Callable[[], Any], timeout: float = TIMEOUT, logs: Path | None = None
) -> Any:
    """``check()``'s first truthy result; fail with ``what`` (and the logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.TransportError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tail = (
                "".join(p.read_text(errors="replace")[-4000:] for p in sorted(logs.glob("*.log")))
                if logs
                else ""
            )
            raise AssertionError(f"{what} not after {timeout} s\n{tail}")
        time.sleep(0.5)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url + "metrics", timeout=30)
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tensorflow_loaded(pid: int) -> bool:
    """Whether TensorFlow's native library is mapped into process ``pid``."""
    return "tensorflow" in Path(f"/proc/{pid}/maps").read_text()


class Process:
    """A ``triage-node`` command in its own process group, logging to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(CLI), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM to the main process only (Celery stops its pool itself); kill if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private Redis server (no persistence) on a free port."""
    server = shutil.which("redis-server")
    assert server, "redis-server not installed"
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def test_dicom_web_and_worker_roles_share_database_and_broker(
    tmp_path: Path, postgres_url: str, redis_url: str, shared_data: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg = node_config(
        tmp_path,
        postgres_url,
        study={"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
        web={"enabled": True},
        pipeline={"broker_url": redis_url, "workers": 0},
        worker={"tf_threads": 1, "http_port": 0},
    )
    config = write_config(tmp_path / "node.toml", cfg)
    dicom_port, service_port = cfg["dicom"]["port"], cfg["web"]["port"]
    web_port, web_dicom_port, worker_port = free_port(), free_port(), free_port()
    service, web = f"http://127.0.0.1:{service_port}/", f"http://127.0.0.1:{web_port}/"
    worker_url = f"http://127.0.0.1:{worker_port}/"
    processes: list[Process] = []
    try:
        dicom = Process(["serve", "--role", "dicom", "--config", str(config)], logs / "dicom.log")
        processes.append(dicom)
        poll(
            "DICOM role ready",
            lambda: httpx.get(service + "readyz", timeout=10).status_code == 200,
            logs=logs,
        )
        assert listening(dicom_port)

        # The web role: role from the environment, its own HTTP port, and a DICOM port
        # setting it must not open.
        web_env = {
            "TRIAGE_NODE_ROLE": "web",
            "TRIAGE_NODE_WEB__PORT": str(web_port),
            "TRIAGE_NODE_DICOM__PORT": str(web_dicom_port),
        }
        web_proc = Process(["serve", "--config", str(config)], logs / "web.log", web_env)
        processes.append(web_proc)
        poll(
            "web role ready",
            lambda: httpx.get(web + "readyz", timeout=10).status_code == 200,
            logs=logs,
        )
        assert not listening(web_dicom_port)

        worker = Process(
            [
                "worker",
                "--config",
                str(config),
                "--concurrency",
                "1",
                "--http-port",
                str(worker_port),
            ],
            logs / "worker.log",
        )
        processes.append(worker)
        poll(
            "worker ready",
            lambda: httpx.get(worker_url + "readyz", timeout=10).status_code == 200,
            logs=logs,
        )

        # Readiness names its checks, by role; the images' healthcheck command agrees.
        checks = httpx.get(service + "readyz", timeout=30).json()["checks"]
        assert set(checks) == {"database", "storage", "dicom_listener", "broker"}, checks
        assert set(httpx.get(web + "readyz", timeout=30).json()["checks"]) == {
            "database",
            "storage",
        }

        def healthcheck(*args: str, **env: str) -> int:
            return subprocess.run(
                [str(CLI), "health", "--config", str(config), *args],
                env={**os.environ, **env},
                capture_output=True,
                timeout=60,
                check=False,
            ).returncode

        assert healthcheck() == 0  # the dicom role's web.port
        assert healthcheck(TRIAGE_NODE_WEB__PORT=str(web_port)) == 0
        assert healthcheck("--worker", TRIAGE_NODE_WORKER__HTTP_PORT=str(worker_port)) == 0
        assert healthcheck(TRIAGE_NODE_WEB__PORT=str(free_port())) == 1

        subprocess.run(
            [
                str(CLI),
                "users",
                "add",
                "reader",
                "--role",
                "radiologist",
                "--password-stdin",
                "--config",
                str(config),
            ],
            input="correct horse battery staple\n",
            text=True,
            check=True,
            capture_output=True,
        )

        jpeg = sorted((shared_data / "cxr-pneumonia" / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
        study_uid, _ = cxr_from_jpeg(jpeg, tmp_path / "cxr.dcm")
        assert storescu(dicom_port, [tmp_path / "cxr.dcm"]).returncode == 0

        # The web role sees what the DICOM role received and the worker analysed.
        with httpx.Client(base_url=web, timeout=30) as client:
            login = client.post(
                "/api/session",
                json={
                    "name": "reader",
                    "password": "correct horse battery staple",  # pragma: allowlist secret
                },
            )
            assert login.status_code == 200, login.text

            def study_done() -> dict[str, Any] | None:
                response = client.get(f"/api/studies/{study_uid}")
                body = response.json() if response.status_code == 200 else {}
                return body if body.get("status") in ("done", "failed") else None

            study = poll("study done in the web role", study_done, logs=logs)
            assert study["status"] == "done", study["status_reason"]
            assert study["key_finding"] in ("pneumonia", "normal")
            assert client.get("/").status_code == 200  # the worklist page

        # The DICOM role serves machines only: no pages, no login, no REST API for people.
        for path in ("", "login", "docs", "api/worklist", f"api/studies/{study_uid}"):
            assert httpx.get(service + path, timeout=30).status_code == 404, path
        # ... and its internal API is switched off without cluster.token.
        assert httpx.get(service + f"dicomweb/studies/{study_uid}", timeout=30).status_code == 404

        live = httpx.get(service + "healthz", timeout=30).json()
        assert live["role"] == "dicom" and live["components"]["dicom"] is True
        assert "http" in live["components"] and all(live["components"].values())
        m = metrics(service)
        assert m[("triage_instances_received_total", (("result", "stored"),))] == 1
        assert m[("triage_dicom_associations_total", (("result", "accepted"),))] >= 1
        assert m[("triage_studies", (("state", "done"),))] == 1
        assert m[("triage_queue_depth", (("queue", "routine"),))] == 0
        assert m[("triage_source_up", (("source", "broker"),))] == 1

        live = httpx.get(web + "healthz", timeout=30).json()
        assert live["role"] == "web" and live["components"] == {"http": True}
        m = metrics(web)
        assert m[("triage_studies", (("state", "done"),))] == 1  # shared database
        assert ("triage_queue_depth", (("queue", "routine"),)) not in m  # no broker here
        assert m.get(("triage_instances_received_total", (("result", "stored"),)), 0) == 0

        # The worker's metrics sum its pool process: one task, both models timed.
        live = httpx.get(worker_url + "healthz", timeout=30)
        assert live.status_code == 200 and live.json()["consuming"] is True
        assert len(live.json()["processes"]) == 1
        m = poll(
            "worker task metrics",
            lambda: (
                (x := metrics(worker_url))
                and x.get(("triage_task_duration_seconds_count", (("outcome", "done"),)))
                and x
            ),
            logs=logs,
        )
        assert m[("triage_task_duration_seconds_count", (("outcome", "done"),))] == 1
        for model in ("pneumonia-triage", "lung-seg"):
            assert m[("triage_inference_seconds_count", (("model", model),))] >= 1
        # TensorFlow is mapped into the worker's pool process, never into the node roles.
        assert tensorflow_loaded(live.json()["processes"][0])
        assert not tensorflow_loaded(dicom.proc.pid) and not tensorflow_loaded(web_proc.proc.pid)
        # worker.tf_threads took effect in the pool process (TensorFlow reports it back).
        assert re.search(r"TensorFlow threads intra_op=1 inter_op=1", worker.log.read_text())

        for process in reversed(processes):
            assert process.stop() == 0, process.log.read_text()[-3000:]
        assert not list((tmp_path / "var" / "worker-metrics").glob("*-*")), (
            "metrics dir left behind"
        )
    finally:
        for process in reversed(processes):
            process.stop()
    # Nothing about the patient in any process's log.
    patient = Patient()
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        for value in (patient.name, patient.patient_id, patient.birth_date):
            assert value not in text, f"{value} in {log.name}"
