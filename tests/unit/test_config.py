"""Configuration: defaults, TOML + environment, errors with key and line."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from node.config import AllowedCaller, Settings, load_settings
from node.errors import ConfigError


def test_defaults_are_the_embedded_mode() -> None:
    s = load_settings()
    assert s.database_url.startswith("sqlite:///")
    assert s.database_url.endswith("var/triage-node.db")
    assert s.dicom.ae_title == "TRIAGE"
    assert s.dicom.max_pdu_size >= 1 << 20


def test_toml_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[dicom]\nport = 4242\nae_title = "NODE1"\n[study]\nquiet_seconds = 5\n')
    monkeypatch.setenv("TRIAGE_NODE_DICOM__PORT", "5000")
    s = load_settings(cfg)
    assert s.dicom.port == 5000  # environment wins over the file
    assert s.dicom.ae_title == "NODE1"
    assert s.study.quiet_seconds == 5


def test_mistakes_are_reported_with_key_line_and_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        "[dicom]\n"
        "port = 70000\n"
        'allowed_callers = ["CT1@10.0.0.0/8", "MR1@not-an-ip"]\n'
        "prot = 1\n"
        "[study]\n"
        "quiet_seconds = -1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    problems = info.value.problems
    assert any(p.startswith("line 2: dicom.port:") and "65535" in p for p in problems)
    assert any(p.startswith("line 3: dicom.allowed_callers.1.host:") for p in problems)
    assert any(p.startswith("line 4: dicom.prot:") for p in problems)
    assert any(p.startswith("line 6: study.quiet_seconds:") for p in problems)


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[dicom]\nport = \n")
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(cfg)


@pytest.mark.parametrize("title", ["", "A" * 17, "BAD\\AE", "   "])
def test_invalid_ae_titles_are_refused(title: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(dicom={"ae_title": title})


@pytest.mark.parametrize("key", ["device_name", "institution_name"])
def test_names_written_into_objects_fit_their_vr(key: str) -> None:
    """LO holds 64 characters: a longer name would make every SEG, SR and heatmap
    invalid (highdicom refuses it, so the study's objects would not be built)."""
    assert getattr(load_settings(results={key: "H" * 64}).results, key) == "H" * 64
    with pytest.raises(ConfigError, match=f"results.{key}"):
        load_settings(results={key: "H" * 65})


def test_allowed_caller_forms() -> None:
    s = load_settings(
        dicom={
            "allowed_callers": [
                "CT1",
                "MR1@10.1.2.3",
                {"ae_title": "US1", "host": "192.168.0.0/16"},
            ]
        }
    )
    ct, mr, us = s.dicom.allowed_callers
    assert ct.admits("CT1", "203.0.113.9")
    assert mr.admits("MR1", "10.1.2.3") and not mr.admits("MR1", "10.1.2.4")
    assert us.admits("US1", "192.168.7.7") and not us.admits("US1", "10.0.0.1")
    assert not ct.admits("CT2", "10.0.0.1")
    assert AllowedCaller.parse("X@1.2.3.4") == {"ae_title": "X", "host": "1.2.3.4"}


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not AllowedCaller:
            keys |= _keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _doc_keys(doc: dict[str, object], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in doc.items():
        if isinstance(v, dict):
            keys |= _doc_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def test_example_config_documents_every_key(example_config: Path) -> None:
    """config.example.toml is valid and sets every key the settings model has."""
    text = example_config.read_text()
    documented = _doc_keys(tomllib.loads(text))
    # Keys may also be documented as commented-out examples ("# key = ...").
    commented = {
        line.lstrip("# ").split("=")[0].strip() for line in text.splitlines() if "=" in line
    }
    # ...and tables as "# [[name]]" / "# [name]".
    commented |= {
        line.lstrip("# ").strip("[] ")
        for line in text.splitlines()
        if line.lstrip("# ").startswith("[")
    }
    missing = {
        k for k in _keys(Settings) if k not in documented and k.split(".")[-1] not in commented
    }
    assert not missing, f"config.example.toml lacks: {sorted(missing)}"


def test_secret_in_config_file_is_refused_with_its_line(tmp_path: Path) -> None:
    """Secrets come from the environment or owner-only files, never the (copied) TOML file."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[web]\nport = 8081\nsecret_key = "abc"\n\n[database]\n'
        'url = "postgresql+psycopg://triage:hunter2@db/triage"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert "line 3: web.secret_key" in text
    assert "line 6: database.url" in text and "password" in text
    assert "hunter2" not in text


def test_secret_file_must_be_owner_only(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    path = tmp_path / "c.toml"
    path.write_text(f'[cluster]\ntoken_file = "{secret}"\n')
    with pytest.raises(ConfigError, match="chmod 600"):
        load_settings(path)
    secret.chmod(0o600)
    assert load_settings(path).cluster.token == "s3cret"


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_NODE_PRIVACY__PSEUDONYM_KEY", "k" * 32)
    assert load_settings().privacy.pseudonym_key == "k" * 32


def test_deidentifying_destination_needs_pseudonym_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[destinations]]\nname = "RESEARCH"\nae_title = "R"\nhost = "10.0.0.1"\n'
        "port = 104\ndeidentify = true\n"
    )
    with pytest.raises(ConfigError, match="pseudonym_key"):
        load_settings(path)


def test_deidentifying_destination_gets_no_heatmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The heatmap SC carries the source's pixels (BurnedInAnnotation YES), which
    # de-identification refuses: asked for explicitly, it is a configuration error...
    monkeypatch.setenv("TRIAGE_NODE_PRIVACY__PSEUDONYM_KEY", "k" * 32)
    destination = '[[destinations]]\nname = "R"\nae_title = "R"\nhost = "10.0.0.1"\nport = 104\n'
    path = tmp_path / "c.toml"
    path.write_text(destination + 'deidentify = true\nkinds = ["seg", "sr", "sc"]\n')
    with pytest.raises(ConfigError, match=r"destinations\.0: .*kinds: sc \(the heatmap"):
        load_settings(path)
    # ... and by default such a destination gets every other kind.
    path.write_text(destination + "deidentify = true\n")
    assert load_settings(path).destinations[0].kinds == ["seg", "sr"]
    path.write_text(destination + 'deidentify = true\nkinds = ["sr"]\n')
    assert load_settings(path).destinations[0].kinds == ["sr"]
    path.write_text(destination)
    assert load_settings(path).destinations[0].kinds == ["seg", "sr", "sc"]


def _problems(path: Path | None = None, **overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **overrides)
    return "\n".join(info.value.problems)


def test_unreadable_secret_file_is_a_problem_of_its_key(tmp_path: Path) -> None:
    """A directory, a missing file or non-text: the key and the reason, never a traceback."""
    folder = tmp_path / "secretdir"
    folder.mkdir(mode=0o700)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[web]\nport = 8081\nsecret_key_file = "{folder}"\n')
    problems = _problems(cfg)
    assert problems.startswith("line 3: web.secret_key_file: ")
    assert str(folder) in problems and "directory" in problems
    cfg.write_text(f'[web]\nport = 8081\nsecret_key_file = "{tmp_path / "missing"}"\n')
    assert "line 3: web.secret_key_file: " in _problems(cfg)
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe\x00")
    binary.chmod(0o600)
    cfg.write_text(f'[cluster]\ntoken_file = "{binary}"\n')
    assert "cluster.token_file: " in _problems(cfg) and "UTF-8" in _problems(cfg)


def test_allowed_callers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented AE@host form works in the environment: one entry or a comma list."""
    monkeypatch.setenv("TRIAGE_NODE_DICOM__ALLOWED_CALLERS", "STORESCU@10.0.0.1")
    assert [str(c) for c in load_settings().dicom.allowed_callers] == ["STORESCU@10.0.0.1"]
    monkeypatch.setenv("TRIAGE_NODE_DICOM__ALLOWED_CALLERS", "CT1@10.0.0.0/8, MR1")
    assert [str(c) for c in load_settings().dicom.allowed_callers] == ["CT1@10.0.0.0/8", "MR1"]
    monkeypatch.setenv("TRIAGE_NODE_DICOM__ALLOWED_CALLERS", '["CT1", {"ae_title": "US1"}]')
    assert [str(c) for c in load_settings().dicom.allowed_callers] == ["CT1", "US1"]
    monkeypatch.setenv("TRIAGE_NODE_DICOM__ALLOWED_CALLERS", "MR1@not-an-ip")
    problems = _problems()
    assert "from TRIAGE_NODE_DICOM__ALLOWED_CALLERS: dicom.allowed_callers.0.host:" in problems


def test_undecodable_environment_table_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings' SettingsError (raised before validation) becomes a ConfigError."""
    monkeypatch.setenv("TRIAGE_NODE_DESTINATIONS", "PACS@10.0.0.9")
    problems = _problems()
    assert problems.startswith("from TRIAGE_NODE_DESTINATIONS: destinations: not valid JSON")
    assert "as JSON, e.g." in problems


def test_environment_errors_are_not_blamed_on_a_file_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\ndata_dir = "var"\n\n[dicom]\nport = 11112\n')
    monkeypatch.setenv("TRIAGE_NODE_DICOM__PORT", "abc")
    problems = _problems(cfg)
    assert problems.startswith("from TRIAGE_NODE_DICOM__PORT: dicom.port: ")
    assert "line" not in problems
    monkeypatch.delenv("TRIAGE_NODE_DICOM__PORT")
    cfg.write_text("[dicom]\nport = 0\n")
    assert _problems(cfg).startswith("line 2: dicom.port: ")  # the file's own mistakes still are
    assert _problems(cfg, dicom={"port": 0}).startswith("dicom.port: ")  # a keyword argument


_PASSWORD = "hunter2"  # pragma: allowlist secret


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("foo", "not a database URL"),
        ("postgres://triage:{pw}@db/triage", "unknown database dialect"),
        ("postgresql+nosuchdriver://triage:{pw}@db/x", "unknown database"),
        ("postgresql+psycopg://triage:{pw}@db:port/x", "not a database URL"),
    ],
)
def test_database_url_is_checked_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, url: str, reason: str
) -> None:
    """Found by "config check", not by serve or worker's first connection (a traceback)."""
    monkeypatch.setenv("TRIAGE_NODE_DATABASE__URL", url.format(pw=_PASSWORD))
    problems = _problems()
    assert problems.startswith("from TRIAGE_NODE_DATABASE__URL: database.url: ")
    assert reason in problems
    assert _PASSWORD not in problems


def test_database_url_from_file_is_checked(tmp_path: Path) -> None:
    secret = tmp_path / "db-url"
    secret.write_text(f"postgres://triage:{_PASSWORD}@db/triage\n")
    secret.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\nurl_file = "{secret}"\n')
    problems = _problems(cfg)
    assert "database: " in problems and "url_file: unknown database dialect" in problems
    assert _PASSWORD not in problems
    secret.write_text(f"postgresql+psycopg://triage:{_PASSWORD}@db/triage\n")
    assert load_settings(cfg).database.url.startswith("postgresql+psycopg://")


def test_good_database_urls_pass() -> None:
    for url in ("sqlite:////tmp/x.db", "postgresql+psycopg://triage@db/triage"):
        assert load_settings(database={"url": url}).database_url == url


def _weights(folder: Path) -> Path:
    from models.registry import SHIPPED_DIR

    folder.mkdir()
    for name in ("pneumonia-triage", "lung-seg"):
        (folder / f"{name}.json").write_text((SHIPPED_DIR / f"{name}.json").read_text())
        (folder / f"{name}.weights.npz").write_bytes(b"")
    return folder


def test_weights_dir_is_checked_at_load(tmp_path: Path) -> None:
    """A missing folder, metadata or weights file is refused at start, not by every study."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models]\nweights_dir = "{tmp_path / "none"}"\n')
    assert _problems(cfg).startswith("line 2: models.weights_dir: ")
    assert "is not a folder" in _problems(cfg)
    folder = _weights(tmp_path / "w")
    cfg.write_text(f'[models]\nweights_dir = "{folder}"\n')
    assert load_settings(cfg).models.weights_dir == folder
    (folder / "lung-seg.weights.npz").unlink()
    assert "lung-seg.weights.npz (the weights_file of lung-seg.json) is missing" in _problems(cfg)
    (folder / "pneumonia-triage.json").unlink()
    assert "cannot read" in _problems(cfg) and "pneumonia-triage.json" in _problems(cfg)
