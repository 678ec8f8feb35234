"""The ``triage-node`` command line (Typer + Rich)."""

from __future__ import annotations

import enum
import gc
import json
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from models.cli import app as model_app
from node import __version__
from node.cli_options import ConfigOption, cli_user, settings_or_exit
from node.config import Settings
from node.db.models import ExportState
from node.errors import NodeError
from node.retention_cli import app as retention_app

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from node.runtime import Node
from node.routing.cli import app as rules_app
from node.users.cli import app as users_app

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="triage-node",
    help="DICOM-native AI triage node: receive studies, run models, return DICOM results.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration files.", no_args_is_help=True)
exports_app = typer.Typer(
    help="Deliveries of results (and forwarded originals) to destinations.",
    invoke_without_command=True,
)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(exports_app, name="exports")
# models.cli imports TensorFlow only inside its commands, so this stays cheap.
app.add_typer(model_app, name="model")
app.add_typer(retention_app, name="retention")
app.add_typer(rules_app, name="rules")
app.add_typer(users_app, name="users")


_settings = settings_or_exit


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database, at the current schema.

    Like ``serve``, commands migrate the schema when ``database.auto_upgrade`` is on;
    otherwise an outdated schema is refused with what to run.
    """
    from node.db import migrate
    from node.db.engine import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        if settings.database.auto_upgrade:
            migrate.upgrade(engine)
        elif not migrate.is_up_to_date(engine):
            err_console.print(
                "[red]error:[/red] database schema is out of date; run 'triage-node db upgrade'"
            )
            raise typer.Exit(1)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@contextmanager
def _database_errors(settings: Settings, doing: str) -> Iterator[None]:
    """Turn a database failure into one line on stderr and exit 1, not a traceback.

    Only the error's first line (SQLAlchemy appends the statement and a link), with
    the database password masked should a driver repeat the URL.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, OSError) as exc:
        text = next(iter(str(exc).splitlines()), "")
        try:
            password = make_url(settings.database_url).password
        except (ArgumentError, ValueError):
            password = None
        if password:
            text = text.replace(str(password), "***")
        err_console.print(
            f"[red]error:[/red] cannot {doing}: {type(exc).__name__}: {escape(text)}",
            soft_wrap=True,  # one line, however narrow the terminal
        )
        raise typer.Exit(1) from None


#: Control characters (tab and line breaks above all) as spaces: a field of a
#: tab-separated line must not split it.
_ONE_LINE = str.maketrans(dict.fromkeys([*map(chr, range(32)), "\x7f"], " "))


def _field(text: str) -> str:
    """``text`` as one field of a tab-separated, one-line-per-record output."""
    return text.translate(_ONE_LINE)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


#: What each part of a role is called in the banner (keys of Node.components()).
_PARTS = {
    "dicom": "DICOM listener",
    "completion": "study completion",
    "supervisor": "routing and queueing",
    "exporter": "exporter",
    "retention": "retention",
    "internal_http": "internal API listener",
}


def _role_summary(node: Node) -> str:
    """The role and what runs in it, from the node's actual components."""
    if node.role != "dicom":
        http = "web app"
    elif node.serves_internal_api_on_web_port:
        http = "HTTP service (health, metrics, internal API)"
    else:
        http = "HTTP service (health, metrics)"
    parts = [http if name == "http" else _PARTS.get(name, name) for name in node.components()]
    _, workers = node.worker_processes()
    if workers:
        parts.append(f"{workers} worker process(es)")
    return f"[cyan]{node.role}[/cyan]: " + ", ".join(parts)


def _broker_text(settings: Settings) -> str:
    """Where the broker is, without credentials."""
    pipeline = settings.pipeline
    if not pipeline.broker_url:
        return "embedded (SQLite, no server)"
    from sqlalchemy.engine import make_url

    broker = make_url(pipeline.broker_url.replace("redis://", "redis+x://", 1))
    where = f"{broker.host or ''}:{broker.port or ''}".strip(":")
    return f"{pipeline.broker_url.split(':', 1)[0]} at {where}"


def _http_rows(grid: Table, settings: Settings, node: Node) -> None:
    """The banner's rows for the web port, the internal API and the health endpoints."""
    url = node.web_url
    if url is None:
        web = "disabled"
    elif node.role == "dicom":
        web = f"{url}  (service only: no pages; the worklist runs in 'serve --role web')"
    else:
        from node.users.accounts import Accounts

        web = f"{url}  (worklist; REST API docs at {url}docs)"
        if not Accounts(node.sessions).list():
            web += "\nno accounts yet: triage-node users add NAME --role admin"
    grid.add_row("Web", web)
    if node.internal_url is not None:
        grid.add_row("Internal API", f"{node.internal_url}  (workers and the web role; token)")
    if url is not None:
        grid.add_row(
            "Health",
            f"{url}healthz, {url}readyz" + (f", {url}metrics" if settings.web.metrics else ""),
        )


def _show_running(settings: Settings, node: Node) -> bool:
    """Print the role and where everything is; with a listener, C-ECHO it.

    True when the listener answered (or the role has none).
    """
    d = settings.dicom
    echo_host = "127.0.0.1" if d.host in ("0.0.0.0", "::") else d.host  # noqa: S104 # nosec B104
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("Role", _role_summary(node))
    if node.dicom is not None:
        plain = f"on {d.host}:{node.dicom.port}" if d.plain else "plain listener off"
        grid.add_row("DICOM", f"AE title [cyan]{d.ae_title}[/cyan] {plain}")
        if node.dicom.tls_port is not None:
            grid.add_row(
                "DICOM TLS",
                f"port {node.dicom.tls_port}"
                + ("; client certificates required" if d.tls.require_client_certificate else "")
                + ("" if d.plain else "; TLS only (no plain listener)"),
            )
        grid.add_row("Accepts", ", ".join(str(c) for c in d.allowed_callers) or "(nobody)")
    else:
        grid.add_row("DICOM", "not in this role ('serve --role dicom' runs the listener)")
    _http_rows(grid, settings, node)
    if node.pipeline is not None:
        grid.add_row(
            "Pipeline",
            f"{settings.pipeline.workers} worker process(es) started here; "
            f"broker {_broker_text(settings)}",
        )
    refuses = f", refuses below {_human_bytes(settings.storage.min_free_bytes)}"
    grid.add_row(
        "Data",
        f"{node.store.data_dir}  (free {_human_bytes(node.store.free_bytes())}"
        f"{refuses if node.dicom is not None else ''})",
    )
    grid.add_row("Database", node.engine.url.render_as_string(hide_password=True))
    problems = node.readiness_problems()
    grid.add_row(
        "Ready", "[green]yes[/green]" if not problems else f"[yellow]no: {'; '.join(problems)}"
    )
    ok = True
    if node.dicom is not None and not d.plain:
        # TLS only: a plain C-ECHO has nowhere to go, and with mutual TLS we hold no
        # client certificate; report the listener instead.
        ok = node.dicom.listening
        grid.add_row(
            "Self-check",
            "[green]TLS listener is up (no plain C-ECHO in TLS-only mode)[/green]"
            if ok
            else "[red]TLS listener is not running[/red]",
        )
    elif node.dicom is not None:
        from node.verification import c_echo

        port = node.dicom.port
        check = c_echo(echo_host, port, called_ae_title=d.ae_title, calling_ae_title=d.ae_title)
        ok = check.ok
        grid.add_row(
            "Studies", f"complete after {settings.study.quiet_seconds:g} s without a new instance"
        )
        grid.add_row(
            "Self-check",
            f"[green]C-ECHO to {d.ae_title}@{echo_host}:{port} succeeded[/green]"
            if check.ok
            else f"[red]C-ECHO failed: {check.detail}[/red]",
        )
        grid.add_row(
            "Try",
            f"TCP_NODELAY=1 storescu -aec {d.ae_title} {echo_host} {port} FILE.dcm"
            f"   then: triage-node studies",
        )
    title = f"triage-node {__version__} is running (role {node.role})"
    console.print(Panel(grid, title=title, expand=False))
    return ok


class ServeRole(enum.StrEnum):
    """``serve --role``: what this process runs (see node.runtime)."""

    ALL = "all"
    DICOM = "dicom"
    WEB = "web"


@app.command()
def serve(
    config: ConfigOption = None,
    role: Annotated[
        ServeRole,
        typer.Option(
            envvar="TRIAGE_NODE_ROLE",
            help="all: everything in this process. dicom: listener, completion, routing, "
            "exporter, retention, embedded workers, and health/metrics/internal API over "
            "HTTP (no pages). web: worklist, REST API and admin pages only.",
        ),
    ] = ServeRole.ALL,
) -> None:
    """Run the node in a role until Ctrl-C (default: everything in one process)."""
    from node.logs import configure_logging
    from node.runtime import Node

    settings = _settings(config)
    configure_logging(settings.logging.level, json_format=settings.logging.json_format)
    try:
        node = Node(settings, role=role.value, config_path=config)
    except NodeError as exc:
        err_console.print(f"[red]error:[/red] cannot start role {role.value}: {exc}")
        raise typer.Exit(2) from None
    with console.status("Preparing database and starting listeners..."):
        try:
            node.start()
        except (NodeError, OSError) as exc:
            err_console.print(f"[red]error:[/red] cannot start: {exc}")
            node.stop()
            raise typer.Exit(1) from None
    check_ok = _show_running(settings, node)
    # Everything built so far lives as long as the process. Freezing it keeps the
    # cyclic collector off those ~150k objects: pynetdicom's server calls
    # gc.collect() every 60 associations, and a full pass over them held the GIL
    # for ~60 ms, stalling every association in flight.
    gc.collect()
    gc.freeze()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        console.print("Stopping...")
        node.stop()
    if not check_ok:
        raise typer.Exit(1)


@app.command()
def studies(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many studies.")] = 100,
) -> None:
    """List studies, most urgent first: UID, accession, modality, instances, status, priority."""
    from node.worklist import list_studies

    settings = _settings(config)
    with (
        _database_errors(settings, "read studies"),
        _database(settings) as sessions,
        sessions() as session,
    ):
        rows = list_studies(session, limit=limit)
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return
    if not rows:
        console.print("No studies yet.")
        return
    header = (
        "StudyInstanceUID",
        "Accession",
        "Modality",
        "Instances",
        "Status",
        "Priority",
        "Finding",
        "First received (UTC)",
        "Last received (UTC)",
        "Reason",
    )
    lines = [
        (
            r.study_instance_uid,
            r.accession_number or "-",
            r.modalities or "-",
            str(r.instance_count),
            r.status if r.version == 1 else f"{r.status}(v{r.version})",
            r.priority,
            f"{r.key_finding} {r.key_score:.2f}" if r.key_score is not None else "-",
            f"{r.first_received_at:%Y-%m-%d %H:%M:%S}",
            f"{r.last_received_at:%Y-%m-%d %H:%M:%S}",
            r.status_reason or "",
        )
        for r in rows
    ]
    if not console.is_terminal:
        # One line per study, tab-separated, for scripts and pipes.
        for line in (header, *lines):
            print("\t".join(_field(cell) for cell in line))
        return
    table = Table(box=None, header_style="bold")
    for col in header:
        table.add_column(col, no_wrap=True)
    for line in lines:
        # Accession numbers come from the sender and reasons hold error text: never markup.
        table.add_row(*(escape(cell) for cell in line))
    console.print(table)


@app.command()
def reprocess(
    study_uid: Annotated[
        str, typer.Argument(help="StudyInstanceUID of a done, failed or not routed study.")
    ],
    config: ConfigOption = None,
) -> None:
    """Route and analyse a study again; its results replace the earlier ones (same UIDs)."""
    from node.db.models import StudyStatus
    from node.errors import StudyPurged
    from node.pipeline import Pipeline
    from node.routing.store import RuleStore
    from node.storage import InstanceStore
    from node.web.audit import AuditTrail
    from workers.celery_app import make_celery

    settings = _settings(config)
    with _database(settings) as sessions:
        rules = RuleStore(sessions, known_destinations=[d.name for d in settings.destinations])
        store = InstanceStore(settings.storage.data_dir)
        pipeline = Pipeline(settings, sessions, store, rules, make_celery(settings))
        try:
            status = pipeline.reprocess(study_uid)
        except StudyPurged as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        if status is not None:
            AuditTrail(sessions).record(cli_user(), "study.reprocess", study_instance_uid=study_uid)
    if status is None:
        err_console.print("[red]error:[/red] no done, failed or not-routed study with that UID")
        raise typer.Exit(1)
    if status == StudyStatus.COMPLETE:
        err_console.print(
            "[yellow]Routing failed; the node retries it (see the study's status reason).[/yellow]"
        )
        raise typer.Exit(1)
    if status == StudyStatus.NOT_ROUTED:
        console.print("No rule matches the study now: it is not routed.")
        return
    console.print("Study queued for processing again.")


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str, typer.Option(help="Queues, most urgent first.")] = "stat,urgent,routine",
    concurrency: Annotated[int, typer.Option(min=1, help="Processes running tasks.")] = 1,
    name: Annotated[str | None, typer.Option(help="Worker name (Celery node name).")] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Port of /healthz, /readyz, /metrics (default worker.http_port; 0: off).",
        ),
    ] = None,
) -> None:
    """Run a Celery worker: take studies from the queues, most urgent first, and run the models.

    The main process consumes and serves the health endpoint; ``--concurrency`` pool
    processes (forked) run the tasks, each with worker.tf_threads TensorFlow threads.
    """
    import os
    import shutil

    from node.logs import configure_logging

    settings = _settings(config)
    known = ("stat", "urgent", "routine")
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    if not wanted or any(q not in known for q in wanted):
        err_console.print(f"[red]error:[/red] --queues takes some of {','.join(known)}")
        raise typer.Exit(2)
    if config is not None:
        os.environ["TRIAGE_NODE_CONFIG"] = str(config.resolve())  # for the task processes
    port = settings.worker.http_port if http_port is None else http_port
    threads = settings.worker.tf_threads or max(1, (os.cpu_count() or 1) // concurrency)
    # Exported before anything imports TensorFlow or prometheus_client, so the pool
    # children (forked later) inherit both (workers.tasks applies the thread counts).
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(min(2, threads))
    configure_logging(settings.logging.level, json_format=settings.logging.json_format)
    from workers.health import prepare_multiprocess_dir

    # Always: with no port of its own (embedded in "serve"), the node sums these files.
    metrics_dir = prepare_multiprocess_dir(settings.storage.data_dir)

    from workers.celery_app import make_celery
    from workers.health import WorkerHealth

    celery = make_celery(settings)
    probes: WorkerHealth | None = None
    if port:
        probes = WorkerHealth(celery, settings, settings.worker.http_host, port)
        probes.multiprocess_dir = metrics_dir
        probes.connect_signals()
        probes.start()
    argv = [
        "worker",
        "--queues",
        ",".join(wanted),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        settings.logging.level,
        "--hostname",
        name or f"triage-{os.getpid()}@%h",
    ]
    try:
        celery.worker_main(argv)
    finally:
        if probes is not None:
            probes.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def echo(
    host: Annotated[
        str | None, typer.Argument(help="Host of the remote AE (or use --destination).")
    ] = None,
    port: Annotated[int | None, typer.Argument(help="Port of the remote AE.")] = None,
    *,
    destination: Annotated[
        str | None,
        typer.Option(
            "--destination",
            "-d",
            help="A configured destination: its host, port, AE titles and TLS, as exports use.",
        ),
    ] = None,
    aec: Annotated[str, typer.Option("--aec", help="Called AE title.")] = "ANY-SCP",
    aet: Annotated[
        str | None, typer.Option("--aet", help="Our calling AE title (default: dicom.ae_title).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO (verification) to a DICOM AE or to a configured destination."""
    from node.verification import c_echo, echo_destination

    settings = _settings(config)
    if destination is not None:
        if host is not None:
            err_console.print("[red]error:[/red] give HOST PORT or --destination, not both")
            raise typer.Exit(2)
        dest = settings.destination(destination)
        if dest is None:
            known = ", ".join(d.name for d in settings.destinations) or "none configured"
            err_console.print(
                f"[red]error:[/red] no destination {escape(destination)!r} ({escape(known)})"
            )
            raise typer.Exit(2)
        result = echo_destination(settings, dest, timeout=timeout)
    elif host is None or port is None:
        err_console.print("[red]error:[/red] give HOST PORT, or --destination NAME")
        raise typer.Exit(2)
    else:
        calling = aet or settings.dicom.ae_title
        result = c_echo(host, port, called_ae_title=aec, calling_ae_title=calling, timeout=timeout)
    (console if result.ok else err_console).print(result.detail, markup=False)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def health(
    config: ConfigOption = None,
    worker: Annotated[
        bool, typer.Option("--worker", help="Probe a worker (worker.http_port), not a node.")
    ] = False,
    live: Annotated[
        bool, typer.Option("--live", help="Liveness (/healthz) instead of readiness (/readyz).")
    ] = False,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait.")] = 8.0,
) -> None:
    """Probe this host's node or worker, as its settings say (HTTPS with web.tls_*).

    The images' HEALTHCHECK: exit 0 when ready (or alive with --live), 1 when not.
    """
    from node.observability.healthcheck import ask, target

    try:
        probe = target(_settings(config), worker=worker, live=live)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    answer = ask(probe, timeout)
    (console if answer.ok else err_console).print(answer.summary, markup=False)
    raise typer.Exit(0 if answer.ok else 1)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from node.db import migrate
    from node.db.engine import make_engine

    settings = _settings(config)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    engine = make_engine(settings.database_url)
    try:
        with console.status(f"Upgrading {engine.url.render_as_string(hide_password=True)}..."):
            migrate.upgrade(engine, revision)
        console.print(f"Database at revision {migrate.current_revision(engine)}.")
    except Exception as exc:
        err_console.print(f"[red]error:[/red] upgrade failed: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Show the database's revision and whether it is up to date."""
    from node.db import migrate
    from node.db.engine import make_engine

    settings = _settings(config)
    with _database_errors(settings, "read the database revision"):
        engine = make_engine(settings.database_url)
        try:
            current, head = migrate.current_revision(engine), migrate.head_revision()
        finally:
            engine.dispose()
    console.print(f"current {current or '(empty)'}; newest {head}")
    raise typer.Exit(0 if current == head else 1)


@exports_app.callback()
def exports_list(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    state: Annotated[
        ExportState | None, typer.Option(help="Only deliveries in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 200,
) -> None:
    """List deliveries, newest first: object, destination, state, attempts, last status."""
    if ctx.invoked_subcommand is not None:
        return
    from node.export.deliveries import list_deliveries

    settings = _settings(config)
    with (
        _database_errors(settings, "read deliveries"),
        _database(settings) as sessions,
        sessions() as session,
    ):
        rows = list_deliveries(session, limit=limit, state=state)
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return
    if not rows:
        console.print("No deliveries.")
        return
    table = Table(box=None, header_style="bold")
    for col in (
        "ID",
        "Destination",
        "Kind",
        "SOPInstanceUID",
        "State",
        "Tries",
        "Last status",
        "Next try / error",
    ):
        table.add_column(col, no_wrap=col != "Next try / error")
    for r in rows:
        status = "-" if r.last_status is None else f"0x{r.last_status:04X}"
        later = (
            f"{r.next_attempt_at:%H:%M:%S}" if r.state == "pending" and r.next_attempt_at else ""
        )
        # A pending delivery that failed before says why next to when it goes again.
        # last_error is the remote PACS's text: never markup.
        why = r.last_error or ""
        cells = (
            str(r.id),
            r.destination,
            r.kind,
            r.sop_instance_uid,
            r.state,
            str(r.attempts),
            status,
            f"{later}: {why}" if later and why else (later or why),
        )
        table.add_row(*(escape(cell) for cell in cells))
    console.print(table)


@exports_app.command("retry")
def exports_retry(
    export_id: Annotated[int, typer.Argument(help="Delivery ID (see 'triage-node exports').")],
    config: ConfigOption = None,
) -> None:
    """Try one delivery again now (after fixing the destination), with a fresh retry window."""
    from node.export.deliveries import retry

    settings = _settings(config)
    with (
        _database_errors(settings, "retry the delivery"),
        _database(settings) as sessions,
        sessions.begin() as session,
    ):
        found = retry(session, export_id)
    if not found:
        err_console.print(f"[red]error:[/red] no delivery with ID {export_id}")
        raise typer.Exit(1)
    console.print(f"Delivery {export_id} queued again; the node sends it within seconds.")


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="TOML file.")],
) -> None:
    """Validate a configuration file; print every problem with its line."""
    _settings(path)
    console.print(f"{path}: OK")


def main() -> None:
    app()
