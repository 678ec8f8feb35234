"""``triage-node rules``: check, test against a DICOM file, and the version commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.cli import app
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import AuditEvent

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "rules.example.toml"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    return path


def test_check_accepts_a_good_file(runner: CliRunner) -> None:
    result = runner.invoke(app, ["rules", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "OK, 3 rule(s)" in result.stdout
    assert "chest-xray" in result.stdout


def test_check_refuses_a_bad_file_with_every_problem(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    text = EXAMPLE.read_text()
    text = text.replace('Modality = ["CR", "DX"]', 'Modalty = ["CR", "DX"]', 1)
    text = text.replace('priority = "routine"', 'priority = "soon"', 1)
    bad.write_text(text)
    result = runner.invoke(app, ["rules", "check", str(bad)])
    assert result.exit_code == 2
    lines = text.splitlines()
    modalty = lines.index('Modalty = ["CR", "DX"]') + 1
    soon = lines.index('priority = "soon"') + 1
    assert f"line {modalty}: rule[0].match.Modalty: unknown DICOM keyword" in result.stderr
    assert f"line {soon}: rule[1].priority:" in result.stderr


def test_check_with_a_config_checks_destinations_like_import(
    runner: CliRunner, tmp_path: Path, config: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'format = 1\n[[rule]]\nname = "a"\npriority = "stat"\nmodels = ["lung-seg"]\n'
        'destinations = ["PACS"]\n'
    )
    assert runner.invoke(app, ["rules", "check", str(rules)]).exit_code == 0
    result = runner.invoke(app, ["rules", "check", str(rules), "--config", str(config)])
    assert result.exit_code == 2
    assert "line 6: rule[0].destinations" in result.stderr and "PACS" in result.stderr


@pytest.mark.parametrize(
    ("name", "exit_code", "expected"),
    [
        ("RG1_UNCR.dcm", 0, "Routed by rule chest-xray: priority routine"),
        ("RG3_J2KR.dcm", 1, "Not routed"),  # a tibia, not a chest
    ],
)
def test_test_with_a_dicom_file(
    runner: CliRunner, shared_data: Path, name: str, exit_code: int, expected: str
) -> None:
    dicom = shared_data / "dicom/modalities/cr" / name
    result = runner.invoke(app, ["rules", "test", str(EXAMPLE), "--file", str(dicom)])
    assert result.exit_code == exit_code, result.output
    assert expected in " ".join(result.stdout.split())
    assert "BodyPartExamined" in result.stdout


def test_test_needs_a_study_or_a_file(runner: CliRunner) -> None:
    result = runner.invoke(app, ["rules", "test", str(EXAMPLE)])
    assert result.exit_code == 2


def test_import_list_activate_and_test_the_active_version(
    runner: CliRunner, config: Path, tmp_path: Path, shared_data: Path
) -> None:
    chest = shared_data / "dicom/modalities/cr/RG1_UNCR.dcm"
    # No version yet: "test" uses what the node would import (the packaged default).
    result = runner.invoke(app, ["rules", "test", "--file", str(chest), "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "not imported yet" in result.stdout

    stat = tmp_path / "stat.toml"
    stat.write_text(EXAMPLE.read_text().replace('priority = "routine"', 'priority = "stat"', 1))
    for path, comment in ((EXAMPLE, "first"), (stat, "chest is stat")):
        result = runner.invoke(
            app,
            [
                "rules",
                "import",
                str(path),
                "--comment",
                comment,
                "--by",
                "alice",
                "-c",
                str(config),
            ],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rules", "test", "--file", str(chest), "-c", str(config)])
    assert "active version 2" in result.stdout
    assert "priority stat" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("format = 1\n[[rule]]\nname = 3\n")
    result = runner.invoke(app, ["rules", "import", str(bad), "-c", str(config)])
    assert result.exit_code == 2

    result = runner.invoke(app, ["rules", "activate", "1", "--by", "bob", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "saved as version 3" in result.stdout
    result = runner.invoke(app, ["rules", "list", "-c", str(config)])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(r[0], r[1] == "active") for r in rows] == [("3", True), ("2", False), ("1", False)]
    assert "rollback to version 1" in result.stdout
    result = runner.invoke(app, ["rules", "show", "-c", str(config)])
    assert result.stdout == EXAMPLE.read_text()

    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
    with make_sessionmaker(engine)() as session:
        events = session.execute(
            select(AuditEvent.user_name, AuditEvent.action, AuditEvent.detail).order_by(
                AuditEvent.id
            )
        ).all()
    engine.dispose()
    assert [tuple(e) for e in events] == [
        ("cli:alice", "rules.save", "version 1 from the command line"),
        ("cli:alice", "rules.save", "version 2 from the command line"),
        ("cli:bob", "rules.activate", "version 1 -> 3"),
    ]


def test_test_with_a_stored_study(
    runner: CliRunner, config: Path, tmp_path: Path, shared_data: Path
) -> None:
    from node.catalog import Catalog
    from node.config import load_settings
    from node.db import migrate
    from node.db.engine import make_engine, make_sessionmaker
    from node.storage import InstanceStore
    from tests.unit.routing.test_attributes import _store_instance

    settings = load_settings(config)
    engine = make_engine(settings.database_url, durable=False)
    migrate.upgrade(engine)
    store = InstanceStore(settings.storage.data_dir, fsync=False)
    data = (shared_data / "dicom/modalities/cr/RG3_J2KR.dcm").read_bytes()
    _store_instance(store, Catalog(make_sessionmaker(engine)), data, "XR1")
    engine.dispose()
    study = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"

    result = runner.invoke(
        app, ["rules", "test", str(EXAMPLE), "--study", study, "-c", str(config)]
    )
    assert result.exit_code == 1, result.output
    assert "'EXTREMITY' != 'CHEST'" in result.stdout
    assert "'XR1' does not match 'ED_*'" in result.stdout
    result = runner.invoke(app, ["rules", "test", "--study", "1.2.3", "-c", str(config)])
    assert result.exit_code == 1
    assert "no study 1.2.3" in result.stderr


def test_a_file_that_routes_nothing_is_checked_with_a_warning_and_not_imported(
    runner: CliRunner, config: Path, tmp_path: Path
) -> None:
    off = tmp_path / "off.toml"
    off.write_text("format = 1\n")
    checked = runner.invoke(app, ["rules", "check", str(off)])
    imported = runner.invoke(app, ["rules", "import", str(off), "-c", str(config)])
    assert (checked.exit_code, imported.exit_code) == (0, 2), imported.output
    assert "no enabled rule" in " ".join(checked.stdout.split())
    refusal = "no enabled rule: every study would be recorded as not routed"
    assert refusal in " ".join(imported.stderr.split())


def test_testing_a_file_with_a_config_refuses_destinations_the_node_lacks(
    runner: CliRunner, config: Path, tmp_path: Path, shared_data: Path
) -> None:
    """The tester said "Routed ... destinations PACS" for rules this node refuses."""
    rules = tmp_path / "rules.toml"
    rules.write_text(EXAMPLE.read_text().replace("destinations = []", 'destinations = ["PACS"]'))
    chest = shared_data / "dicom/modalities/cr/RG1_UNCR.dcm"
    args = ["rules", "test", str(rules), "--file", str(chest)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args, "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "unknown destination 'PACS'" in result.stderr
