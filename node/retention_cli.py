"""``triage-node retention``: run the retention policy now, or see what it would purge."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.cli_options import ConfigOption

app = typer.Typer(help="Retention policy: purge old received images.", no_args_is_help=True)
console = Console()


@app.command("run")
def run(
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be purged.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Purge received images and quarantined files that the retention policy says are due."""
    # node.cli registers this app, so its helpers are imported when the command runs.
    from node.cli import _database, _settings
    from node.retention import Retention
    from node.storage import InstanceStore

    settings = _settings(config)
    store = InstanceStore(settings.storage.data_dir, fsync=settings.storage.fsync)
    with _database(settings) as sessions:
        report = Retention(settings.retention, sessions, store).run(dry_run=dry_run)
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
        return
    verb = "Would purge" if dry_run else "Purged"
    if report.instances_cutoff is None:
        console.print("Received images are kept forever (retention.instances_days = 0).")
    if report.studies:
        table = Table(box=None, header_style="bold")
        for col in ("StudyInstanceUID", "Instances", "Bytes"):
            table.add_column(col)
        for s in report.studies:
            table.add_row(s.study_instance_uid, str(s.instances), str(s.bytes))
        console.print(table)
    console.print(
        f"{verb} {len(report.studies)} studies ({report.instances} instances) and "
        f"{report.quarantine_files} quarantined files, {report.bytes} bytes."
    )
