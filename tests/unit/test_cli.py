"""``triage-node studies``, ``exports``, ``db current`` and ``users``: output that DICOM
senders, remote PACS and a broken database cannot corrupt.

Accession numbers come from the sender, status reasons and delivery errors hold error
text: printed as Rich markup, ``[/b]`` made the commands crash on a terminal, and a tab
or newline split the one-line-per-study output scripts read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from node import cli
from node.db import migrate
from node.db.engine import make_engine, make_sessionmaker
from node.db.models import Export, ExportState, Study, StudyStatus
from node.db.types import utcnow
from tests.nodes import free_port, write_config

UID = "1.2.826.0.1.3680043.10.1234.77"
ACCESSION = "[/b]ACC1"
REASON = "model failed: [bold]x\tcolumn\nsecond line\r[/]"
LAST_ERROR = "[/red]association refused\nby PACS"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "node.toml", {"storage": {"data_dir": str(tmp_path / "var")}})


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """The config's own (SQLite) database, migrated, with one failed study and delivery."""
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'triage-node.db'}")
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    now = utcnow()
    with sessions.begin() as session:
        study = Study(
            study_instance_uid=UID,
            accession_number=ACCESSION,
            modalities="CR",
            calling_ae_title="STORESCU",
            status=StudyStatus.FAILED,
            status_reason=REASON,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(study)
        session.flush()
        session.add(
            Export(
                study_id=study.id,
                study_version=1,
                destination="PACS",
                kind="sr",
                sop_instance_uid=f"{UID}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                path="results/x.dcm",
                state=ExportState.FAILED,
                attempts=3,
                last_error=LAST_ERROR,
                created_at=now,
                retry_started_at=now,
            )
        )
    yield sessions
    engine.dispose()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """node.cli's console as a (wide, colourless) terminal; what it prints."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=400)
    monkeypatch.setattr(cli, "console", console)
    return out


#: Every command that reads or writes the database.
DATABASE_COMMANDS = pytest.mark.parametrize(
    "args",
    [["studies"], ["db", "current"], ["exports"], ["exports", "retry", "1"]],
    ids=["studies", "db-current", "exports", "exports-retry"],
)


def _failed_cleanly(result: Result) -> None:
    """A one-line error and exit 1, not a traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.startswith("error: cannot "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.usefixtures("sessions")
@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("studies", [ACCESSION, "model failed: [bold]x"]),
        ("exports", ["[/red]association refused"]),
    ],
)
def test_tables_print_markup_in_dicom_and_remote_text_literally(
    runner: CliRunner, config: Path, terminal: io.StringIO, command: str, shown: list[str]
) -> None:
    result = runner.invoke(cli.app, [command, "-c", str(config)])
    assert result.exit_code == 0, result.exception
    for text in shown:
        assert text in terminal.getvalue()


@pytest.mark.usefixtures("sessions")
def test_studies_pipe_output_keeps_one_line_per_study(runner: CliRunner, config: Path) -> None:
    result = runner.invoke(cli.app, ["studies", "-c", str(config)])
    assert result.exit_code == 0, result.exception
    header, line = result.stdout.splitlines()
    fields = line.split("\t")
    assert len(fields) == len(header.split("\t")) == 10
    assert fields[0] == UID and fields[1] == ACCESSION
    assert fields[-1] == "model failed: [bold]x column second line [/]"


@pytest.mark.usefixtures("sessions")
def test_studies_json_keeps_the_text_as_it_is(runner: CliRunner, config: Path) -> None:
    result = runner.invoke(cli.app, ["studies", "--json", "-c", str(config)])
    assert result.exit_code == 0, result.exception
    (study,) = json.loads(result.stdout)
    assert (study["AccessionNumber"], study["reason"]) == (ACCESSION, REASON)


@pytest.mark.usefixtures("sessions")
def test_exports_state_takes_only_real_states(runner: CliRunner, config: Path) -> None:
    bogus = runner.invoke(cli.app, ["exports", "--state", "bogus", "-c", str(config)])
    assert bogus.exit_code == 2
    assert "bogus" in bogus.stderr
    failed = runner.invoke(cli.app, ["exports", "--state", "failed", "--json", "-c", str(config)])
    assert failed.exit_code == 0, failed.exception
    assert [d["state"] for d in json.loads(failed.stdout)] == ["failed"]
    delivered = runner.invoke(cli.app, ["exports", "--state", "delivered", "-c", str(config)])
    assert delivered.exit_code == 0, delivered.exception
    assert "No deliveries." in delivered.stdout


def test_a_pending_delivery_says_why_it_waits(
    runner: CliRunner, config: Path, terminal: io.StringIO, sessions: sessionmaker[Session]
) -> None:
    """ "Next try" alone hides why: a pending retry shows the time and the last error."""
    from datetime import timedelta

    with sessions.begin() as session:
        export = session.query(Export).one()
        export.state = ExportState.PENDING
        export.last_error = "association rejected by PACS"
        export.next_attempt_at = utcnow() + timedelta(minutes=5)
    result = runner.invoke(cli.app, ["exports", "-c", str(config)])
    assert result.exit_code == 0, result.exception
    shown = " ".join(terminal.getvalue().split())
    assert f"{export.next_attempt_at:%H:%M:%S}: association rejected by PACS" in shown


@DATABASE_COMMANDS
def test_database_commands_report_a_broken_database_in_one_line(
    runner: CliRunner, tmp_path: Path, args: list[str]
) -> None:
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database, " * 256)
    config = write_config(
        tmp_path / "node.toml",
        {
            "storage": {"data_dir": str(tmp_path / "var")},
            "database": {"url": f"sqlite:///{broken}"},
        },
    )
    result = runner.invoke(cli.app, [*args, "-c", str(config)])
    _failed_cleanly(result)
    assert "DatabaseError" in result.stderr


@DATABASE_COMMANDS
def test_database_commands_report_an_unreachable_server_without_the_password(
    runner: CliRunner, tmp_path: Path, args: list[str]
) -> None:
    password = "hunter2-not-real"  # pragma: allowlist secret
    url = f"postgresql+psycopg://triage:{password}@127.0.0.1:{free_port()}/triage"
    config = write_config(tmp_path / "node.toml", {"storage": {"data_dir": str(tmp_path / "var")}})
    result = runner.invoke(
        cli.app, [*args, "-c", str(config)], env={"TRIAGE_NODE_DATABASE__URL": url}
    )
    _failed_cleanly(result)
    assert "OperationalError" in result.stderr
    assert password not in result.output


def test_users_commands_print_markup_in_names_literally(runner: CliRunner, config: Path) -> None:
    for command in ("disable", "enable"):
        result = runner.invoke(cli.app, ["users", command, "[/b]ghost", "-c", str(config)])
        assert result.exit_code == 1, result.exception
        assert "no user '[/b]ghost'" in result.stderr


def test_users_commands_print_markup_in_config_errors_literally(
    runner: CliRunner, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[storage]\n"[/b]x" = 1\n')
    result = runner.invoke(cli.app, ["users", "list", "-c", str(bad)])
    assert result.exit_code == 2, result.exception
    assert "[/b]x" in result.stderr


@pytest.fixture
def verification_scp() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """A real C-ECHO SCP that answers only to the called AE title "PACS"; it records
    (calling, called) AE titles of every echo it answers."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    seen: list[tuple[str, str]] = []

    def on_echo(event: evt.Event) -> int:
        seen.append((event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)]
    )
    try:
        yield port, seen
    finally:
        server.shutdown()


def test_echo_a_configured_destination_as_exports_reach_it(
    runner: CliRunner, tmp_path: Path, verification_scp: tuple[int, list[tuple[str, str]]]
) -> None:
    port, seen = verification_scp
    config = write_config(
        tmp_path / "node.toml",
        {
            "dicom": {"ae_title": "TRIAGE_HQ"},
            "storage": {"data_dir": str(tmp_path / "var")},
            "destinations": [
                {"name": "main-pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port},
            ],
        },
    )
    done = runner.invoke(cli.app, ["echo", "--destination", "main-pacs", "-c", str(config)])
    assert done.exit_code == 0, done.output
    # No --aet: the node's own AE title, not a made-up one the PACS may refuse.
    done = runner.invoke(
        cli.app, ["echo", "127.0.0.1", str(port), "--aec", "PACS", "-c", str(config)]
    )
    assert done.exit_code == 0, done.output
    assert seen == [("TRIAGE_HQ", "PACS"), ("TRIAGE_HQ", "PACS")]
    unknown = runner.invoke(cli.app, ["echo", "--destination", "nope", "-c", str(config)])
    assert unknown.exit_code == 2 and "main-pacs" in unknown.output
    assert runner.invoke(cli.app, ["echo", "-c", str(config)]).exit_code == 2
