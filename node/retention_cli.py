"""``triage-node retention``: run the retention policy now, or see what it would purge."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli_options import ConfigOption

if TYPE_CHECKING:
    from node.retention import PurgedStudy, PurgeReport

app = typer.Typer(help="Retention policy: purge old received images.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@app.command("run")
def run(
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be purged.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Purge received images and quarantined files that the retention policy says are due.

    Exits 1 when some files could not be deleted (they are kept for the next run).
    """
    # node.cli registers this app, so its helpers are imported when the command runs.
    from node.cli import _database, _database_errors, _settings
    from node.retention import Retention
    from node.storage import InstanceStore

    settings = _settings(config)
    store = InstanceStore(settings.storage.data_dir, fsync=settings.storage.fsync)
    doing = "Listing what is due" if dry_run else "Purging"
    studies = files = 0

    # On stderr, so that --json output stays clean; shown on a terminal only.
    with err_console.status(f"{doing}...") as status:

        def progress(study: PurgedStudy) -> None:
            nonlocal studies, files
            studies += 1
            files += study.instances
            status.update(f"{doing}: {studies} studies, {files} files so far...")

        with _database_errors(settings, "run retention"), _database(settings) as sessions:
            report = Retention(settings.retention, sessions, store).run(
                dry_run=dry_run, progress=progress
            )
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_report(report, dry_run)
    if report.failed_files:
        err_console.print(
            f"[red]error:[/red] {report.failed_files} file(s) could not be deleted; they stay "
            "on disk, not marked purged, and the next run tries again"
        )
        raise typer.Exit(1)


def _print_report(report: PurgeReport, dry_run: bool) -> None:
    verb = "Would purge" if dry_run else "Purged"
    if report.instances_cutoff is None:
        console.print("Received images are kept forever (retention.instances_days = 0).")
    if report.studies:
        table = Table(box=None, header_style="bold")
        for col in ("StudyInstanceUID", "Instances", "Bytes", "Failed"):
            table.add_column(col)
        for s in report.studies:
            table.add_row(s.study_instance_uid, str(s.instances), str(s.bytes), str(s.failed_files))
        console.print(table)
    studies = sum(1 for s in report.studies if s.instances)
    console.print(
        f"{verb} {studies} studies ({report.instances} instances) and "
        f"{report.quarantine_files} quarantined files, {report.bytes} bytes."
    )
