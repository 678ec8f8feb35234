"""The production topology on one machine, with faults: the processes docker-compose runs.

* PostgreSQL: a fresh database on the local server, migrated by ``triage-node db
  upgrade`` (the compose file's ``migrate`` one-shot); every process runs with
  ``database.auto_upgrade = false``.
* Redis: a private ``redis-server`` (append-only file) on a free port, so that it can
  be restarted mid-run without touching the machine's shared one.
* Orthanc as the PACS, receiving the results.
* ``triage-node serve --role dicom`` (listener, routing, export, internal DICOMweb),
  ``triage-node serve --role web`` and two ``triage-node worker`` processes with
  ``worker.storage = "dicomweb"``: the same commands as the compose services.

Separation: every process has its own data directory, so no disk is shared, and the
workers reach the node's store only through its HTTP API with the cluster token. Where
network namespaces can be made (root with ``ip netns``), node, web and each worker run
in a namespace of their own on a private bridge, as on separate hosts: they reach each
other by the bridge addresses only, and PostgreSQL, Redis and Orthanc (which stay in the
root namespace) through TCP forwarders on the bridge's address, because the machine's
shared PostgreSQL listens on 127.0.0.1 only and must not be reconfigured. Elsewhere
everything runs on loopback.

The run: 30 single-image chest studies pushed with storescu in three batches; one
worker killed with SIGKILL (process group) after it has finished a study while work
is still queued; the broker stopped and started again between batches. Then every
study is done exactly once (findings not duplicated), every result object (SEG, SR,
heatmap SC) reached Orthanc once, and the node's ``/metrics`` count 30 instances
received, 30 studies done and the deliveries; the surviving worker's ``/metrics``
shows task durations.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url

from node.db.models import Export, ExportState, Study
from tests.faults.conftest import (
    PrivateRedis,
    assert_processed_once,
    cxr_study,
    wait_all_done,
)
from tests.nodes import CLI, free_port, postgres_database, write_config
from tests.peers import Orthanc, dcmtk_env, require, storescu_responses

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDIES = 30
BATCHES = 3
TOKEN = "topology-test-cluster-token-0123456789"
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
#: What a study's results are: one each, under deterministic UIDs.
RESULT_KINDS = ["sc", "seg", "sr"]


@dataclass
class Proc:
    """One triage-node process of the topology, in a process group of its own."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        # Celery's pool child, or anything else left in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, chars: int = 4000) -> str:
        try:
            return f"--- {self.name}\n{self.log.read_text(errors='replace')[-chars:]}"
        except OSError:
            return f"--- {self.name}: no log"


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def wait_http_ok(url: str, procs: list[Proc], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.alive(), f"{p.name} exited\n{p.tail()}"
        if http_get(url, timeout=5)[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"{url} not OK after {timeout} s\n" + "\n".join(p.tail() for p in procs))


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus samples: (name, sorted labels) -> value."""
    status, body = http_get(url)
    assert status == 200, f"{url}: HTTP {status}"
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def done_count(log: Path) -> int:
    try:
        return log.read_text(errors="replace").count("study done study_uid=")
    except OSError:
        return 0


class Forwarder:
    """A TCP forwarder: connections to ``listen`` are piped to ``target`` (one thread pair each).

    A server restarted behind it is reached again by new connections; open ones break
    with it, as they would without the forwarder.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server((listen_host, 0))
        self.port = int(self._server.getsockname()[1])
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()


class Network:
    """Where the topology's processes run: loopback, or one network namespace each.

    ``host(name)``: the address process ``name`` binds to and is reached at;
    ``argv(name, argv)``: the command that runs it there; ``peer``: the address the
    processes reach the root namespace's servers at; ``expose(port)``: a port there
    that reaches ``127.0.0.1:port`` of the root namespace.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.namespaces: dict[str, str] = {}
        self.peer = "127.0.0.1"
        self._forwarders: list[Forwarder] = []
        self._bridge: str | None = None
        self._addresses: dict[str, str] = {}

    @staticmethod
    def namespaces_possible() -> str | None:
        """None when namespaces can be made here, else why not."""
        if os.environ.get("TRIAGE_TEST_TOPOLOGY_LOOPBACK"):
            return "TRIAGE_TEST_TOPOLOGY_LOOPBACK is set"
        if os.geteuid() != 0:
            return "not root"
        if shutil.which("ip") is None:
            return "no 'ip' command (iproute2)"
        return None

    def create(self) -> Network:
        tag = secrets.token_hex(3)
        used = subprocess.run(
            ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(50):
            net = ipaddress.ip_network(
                f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24"
            )
            prefix = str(net.network_address).rsplit(".", 1)[0] + "."
            if f" {prefix}" not in used:
                break
        else:
            raise RuntimeError("no free 10.x.y.0/24 for the test bridge")
        self._bridge = f"tb{tag}"
        self.peer = f"{prefix}1"
        self._ip("link", "add", self._bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.peer}/24", "dev", self._bridge)
        self._ip("link", "set", self._bridge, "up")
        for i, name in enumerate(self.names):
            ns, outside, inside = f"tn{tag}{i}", f"tv{tag}{i}", f"tp{tag}{i}"
            address = f"{prefix}{i + 2}"
            self._ip("netns", "add", ns)
            self.namespaces[name] = ns
            self._ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self._ip("link", "set", outside, "master", self._bridge)
            self._ip("link", "set", outside, "up")
            self._ip("link", "set", inside, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", inside)
            self._ip("-n", ns, "link", "set", inside, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._addresses[name] = address
        return self

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30)

    def host(self, name: str) -> str:
        return self._addresses.get(name, "127.0.0.1")

    def argv(self, name: str, argv: list[str]) -> list[str]:
        ns = self.namespaces.get(name)
        return argv if ns is None else ["ip", "netns", "exec", ns, *argv]

    def expose(self, port: int) -> int:
        if self._bridge is None:
            return port
        forwarder = Forwarder(self.peer, ("127.0.0.1", port))
        self._forwarders.append(forwarder)
        return forwarder.port

    def remove(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close()
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        if self._bridge is not None:
            subprocess.run(["ip", "link", "del", self._bridge], capture_output=True, check=False)


def wait_for_listener(host: str, port: int, procs: list[Proc], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.alive(), f"{p.name} exited\n{p.tail()}"
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")


def send_until_acknowledged(host: str, port: int, files: list[Path], timeout: float = 300) -> None:
    """storescu ``files`` to ``host``, re-sending what was not acknowledged, as a modality does."""
    pending = list(files)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} instances never acknowledged"
        out = subprocess.run(
            [
                require("storescu"),
                "-v",
                "-nh",
                "-aet",
                "STORESCU",
                "-aec",
                "TRIAGE",
                host,
                str(port),
                *map(str, pending),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=600,
            check=False,
        )
        answers = dict(storescu_responses(out.stdout + out.stderr))
        pending = [f for f in pending if answers.get(f) != "Success"]
        if pending:
            time.sleep(0.5)


@pytest.fixture
def network() -> Iterator[Network]:
    names = ["node", "web", "worker0", "worker1"]
    why_not = Network.namespaces_possible()
    net = Network(names)
    if why_not is None:
        net.create()
        print(
            f"topology in network namespaces on bridge {net.peer}/24: "
            + ", ".join(f"{n} {net.host(n)}" for n in names)
        )
    else:
        print(f"topology on loopback: no network namespaces ({why_not})")
    try:
        yield net
    finally:
        net.remove()


@pytest.fixture
def database() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def _config(
    data_dir: Path,
    *,
    host: str,
    database: str,
    broker: str,
    dicom_port: int,
    web_port: int,
    node_url: str,
    internal_port: int,
    rules: Path,
    pacs: tuple[str, int],
    sender_host: str,
    worker_port: int = 0,
) -> dict[str, Any]:
    return {
        "dicom": {
            "host": host,
            "port": dicom_port,
            "allowed_callers": [f"STORESCU@{sender_host}"],
        },
        "storage": {"data_dir": str(data_dir), "min_free_bytes": 0},
        "study": {"quiet_seconds": 0.5, "check_interval_seconds": 0.1},
        "database": {"url": database, "auto_upgrade": False},
        "web": {"enabled": True, "host": host, "port": web_port},
        "routing": {"rules_file": str(rules)},
        "pipeline": {
            "broker_url": broker,
            "workers": 0,
            "lease_seconds": 20,
            "retry_backoff_seconds": 0.5,
        },
        "export": {"initial_backoff_seconds": 1.0, "max_backoff_seconds": 4.0},
        # The node's internal API on a port of its own (the compose file's 8081); web and
        # workers fetch and upload there, never through a user-facing port.
        "cluster": {"node_url": node_url, "internal_host": host, "internal_port": internal_port},
        "worker": {"storage": "dicomweb", "http_host": host, "http_port": worker_port},
        "destinations": [{"name": "PACS", "ae_title": "ORTHANC", "host": pacs[0], "port": pacs[1]}],
    }


def _upload_status(base: str, token: str = TOKEN) -> int:
    """HTTP status of a result upload to ``base`` (an invalid token writes nothing)."""
    request = urllib.request.Request(
        f"{base}/internal/v1/files/results/1.2.3/probe.bin",
        data=b"x",
        method="PUT",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # nosec B310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_production_topology_survives_a_worker_kill_and_a_broker_restart(
    tmp_path: Path,
    network: Network,
    database: str,
    redis_server: PrivateRedis,
    orthanc: Orthanc,
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    dicom_port, node_http, web_port = free_port(), free_port(), free_port()
    node_internal = free_port()
    worker_ports = [free_port(), free_port()]
    node_host = network.host("node")
    node_service = f"http://{node_host}:{node_http}"  # /readyz, /metrics
    node_url = f"http://{node_host}:{node_internal}"  # the internal API
    # The root namespace's servers, as the topology's processes reach them.
    db_url = make_url(database)
    remote_database = db_url.set(
        host=network.peer, port=network.expose(db_url.port or 5432)
    ).render_as_string(hide_password=False)
    remote_broker = f"redis://{network.peer}:{network.expose(redis_server.port)}/0"
    pacs = (network.peer, network.expose(orthanc.dicom_port))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TRIAGE_NODE_CLUSTER__TOKEN": TOKEN,  # a secret: environment only
    }
    env.pop("TRIAGE_NODE_CONFIG", None)

    def config(name: str, **overrides: int) -> Path:
        cfg = _config(
            tmp_path / name / "data",
            host=network.host(name),
            database=remote_database,
            broker=remote_broker,
            dicom_port=overrides.get("dicom_port", free_port()),
            web_port=overrides.get("web_port", free_port()),
            node_url=node_url,
            internal_port=node_internal,
            rules=rules,
            pacs=pacs,
            sender_host=network.peer,
            worker_port=overrides.get("worker_port", 0),
        )
        (tmp_path / name).mkdir()
        return write_config(tmp_path / name / "triage-node.toml", cfg)

    node_cfg = config("node", dicom_port=dicom_port, web_port=node_http)
    web_cfg = config("web", web_port=web_port)
    worker_cfgs = [config(f"worker{i}", worker_port=p) for i, p in enumerate(worker_ports)]

    # The compose file's one-shot migration, then the long-running processes.
    migrate = subprocess.run(
        network.argv("node", [str(CLI), "db", "upgrade", "--config", str(node_cfg)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr

    node = Proc(
        "node",
        network.argv("node", [str(CLI), "serve", "--role", "dicom", "--config", str(node_cfg)]),
        tmp_path / "node" / "out.log",
        env,
    )
    web = Proc(
        "web",
        network.argv("web", [str(CLI), "serve", "--role", "web", "--config", str(web_cfg)]),
        tmp_path / "web" / "out.log",
        env,
    )
    workers = [
        Proc(
            f"worker{i}",
            network.argv(
                f"worker{i}",
                [
                    str(CLI),
                    "worker",
                    "--concurrency",
                    "1",
                    "--name",
                    f"topo{i}@%h",
                    "--config",
                    str(cfg),
                ],
            ),
            tmp_path / f"worker{i}" / "out.log",
            env,
        )
        for i, cfg in enumerate(worker_cfgs)
    ]
    procs = [node, web, *workers]
    engine = create_engine(database)
    try:
        node.start()
        wait_for_listener(node_host, dicom_port, [node])
        wait_http_ok(f"{node_service}/readyz", [node])
        web.start()
        for w in workers:
            w.start()
        wait_http_ok(f"http://{network.host('web')}:{web_port}/healthz", [web])
        for i, (w, port) in enumerate(zip(workers, worker_ports, strict=True)):
            wait_http_ok(f"http://{network.host(f'worker{i}')}:{port}/healthz", [w])
        # The internal API answers on the node's internal port only: neither the web
        # role's user-facing port nor the node's health port takes a result upload.
        for base in (f"http://{network.host('web')}:{web_port}", node_service):
            assert _upload_status(base) in (404, 405), base
        assert _upload_status(node_url, token="wrong") == 401

        studies: dict[str, list[Path]] = {}
        for i in range(STUDIES):
            uid, files = cxr_study(tmp_path / "studies" / f"{i:02d}", 1, offset=i)
            studies[uid] = files
        batches = [list(studies)[b::BATCHES] for b in range(BATCHES)]

        def push(batch: list[str]) -> None:
            files = [f for uid in batch for f in studies[uid]]
            send_until_acknowledged(node_host, dicom_port, files)

        # Batch 1; kill worker 0 once it has finished a study while work is still queued.
        push(batches[0])
        victim, survivor = workers
        deadline = time.monotonic() + 300
        while done_count(victim.log) == 0:
            assert time.monotonic() < deadline, victim.tail()
            assert victim.alive(), victim.tail()
            time.sleep(0.2)
        push(batches[1])
        victim.kill9()

        # The broker goes away and comes back (same port, same append-only file).
        redis_server.kill9()
        time.sleep(2)
        redis_server.start()
        push(batches[2])

        final = wait_all_done(engine, set(studies), timeout=600)
        assert_processed_once(
            engine,
            tmp_path / "node" / "data",
            final,
            set(studies),
            kinds={"classification", "segmentation"},
        )
        assert done_count(survivor.log) > 0
        retried = sorted(uid for uid, rec in final.items() if rec.attempts > 1)
        print(
            f"topology: done per worker {[done_count(w.log) for w in workers]}, "
            f"studies claimed more than once (worker kill, broker restart): {len(retried)}"
        )

        # Every result object reached the PACS once.
        deadline = time.monotonic() + 300
        while True:
            with engine.connect() as conn:
                exports = conn.execute(
                    select(
                        Study.study_instance_uid,
                        Export.kind,
                        Export.sop_instance_uid,
                        Export.state,
                        Export.last_error,
                    ).join(Study, Study.id == Export.study_id)
                ).all()
            per_study = Counter(e.study_instance_uid for e in exports)
            settled = all(e.state != ExportState.PENDING for e in exports)
            if settled and all(per_study[uid] >= len(RESULT_KINDS) for uid in studies):
                break
            assert time.monotonic() < deadline, [
                (e.kind, e.state, e.last_error) for e in exports if e.state != "delivered"
            ][:10]
            time.sleep(0.5)
        assert all(e.state == ExportState.DELIVERED for e in exports), [
            (e.kind, e.last_error) for e in exports if e.state != ExportState.DELIVERED
        ]
        for uid in studies:
            kinds = sorted(e.kind for e in exports if e.study_instance_uid == uid)
            assert kinds == RESULT_KINDS, f"study {uid}: {kinds}"
        expected = {e.sop_instance_uid for e in exports}
        assert len(expected) == len(exports) == STUDIES * len(RESULT_KINDS)
        in_pacs = Counter(str(i["SOPInstanceUID"]) for i in orthanc.instances())
        assert set(in_pacs) == expected, "PACS holds other objects than the results"

        # What the operators' dashboards see.
        node_metrics = scrape(f"{node_service}/metrics")
        assert metric(node_metrics, "triage_instances_received_total", result="stored") == STUDIES
        assert metric(node_metrics, "triage_studies", state="done") == STUDIES
        assert metric(
            node_metrics, "triage_exports_total", destination="PACS", outcome="delivered"
        ) == STUDIES * len(RESULT_KINDS)
        worker_metrics = scrape(f"http://{network.host('worker1')}:{worker_ports[1]}/metrics")
        assert metric(worker_metrics, "triage_task_duration_seconds_count", outcome="done") >= 1

        # Nobody shared a disk: the node's store holds every instance; the workers'
        # data directories hold no copy of the node's catalogue or store layout.
        for i in range(len(workers)):
            data = tmp_path / f"worker{i}" / "data"
            assert not (data / "instances").exists() or not any(
                (data / "instances").rglob("*.dcm")
            ), f"worker{i} wrote into an instance store of its own"
    except BaseException:
        print("\n".join(p.tail() for p in procs))
        raise
    finally:
        for p in reversed(procs):
            p.stop()
        engine.dispose()
