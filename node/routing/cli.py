"""``triage-node rules ...``: check, test, list, show, import and activate routing rules.

Exit codes: 0 success (``test``: the study is routed), 1 ``test``: not routed or a
study/file cannot be read, 2 invalid rules, configuration or usage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.cli_options import ConfigOption, cli_user, os_user, settings_or_exit
from node.config import Settings
from node.web.audit import AuditTrail

if TYPE_CHECKING:
    from node.routing.store import RuleStore
from node.errors import NodeError, RuleError
from node.routing.match import RuleExplanation, SeriesAttributes, explain, route
from node.routing.rules import Rule, RuleSet, parse_rules

console = Console()
err_console = Console(stderr=True)


app = typer.Typer(
    help="Routing rules: which studies run which models, at what priority, sent where.",
    no_args_is_help=True,
)

RulesFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Rules file (TOML).")]


ByOption = Annotated[str, typer.Option("--by", help="Who makes the change (recorded).")]


_settings = settings_or_exit


def _refuse(exc: RuleError) -> typer.Exit:
    err_console.print(f"[red]refused:[/red] {escape(exc.source)}")
    for problem in exc.problems:
        err_console.print(f"  - {escape(problem)}", soft_wrap=True)
    return typer.Exit(2)


def _load(path: Path, known_destinations: list[str] | None = None) -> RuleSet:
    try:
        return parse_rules(
            path.read_text(encoding="utf-8"), str(path), known_destinations=known_destinations
        )
    except UnicodeDecodeError:
        raise _refuse(RuleError(str(path), ["not a UTF-8 text file"])) from None
    except RuleError as exc:
        raise _refuse(exc) from None


def _rule_store(sessions: sessionmaker[Session], settings: Settings) -> RuleStore:
    """Rules are checked against the destinations this node has configured."""
    from node.routing.store import RuleStore

    return RuleStore(sessions, known_destinations=[d.name for d in settings.destinations])


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    from node.db import migrate
    from node.db.engine import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        if settings.database.auto_upgrade:
            migrate.upgrade(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _conditions(rule: Rule) -> str:
    if not rule.match:
        return "(every study)"
    return "; ".join(f"{k} {c.describe()}" for k, c in rule.match.items())


def _rules_table(rule_set: RuleSet) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("#", "Rule", "Priority", "Models", "Destinations"):
        table.add_column(col, no_wrap=True)
    table.add_column("Conditions", overflow="fold")
    for i, rule in enumerate(rule_set.rules):
        table.add_row(
            str(i),
            escape(rule.name) + ("" if rule.enabled else " [dim](disabled)[/dim]"),
            rule.priority,
            ", ".join(rule.models),
            ", ".join(rule.destinations) or "-",
            escape(_conditions(rule)),
        )
    return table


@app.command("check")
def check(path: RulesFile, config: ConfigOption = None) -> None:
    """Validate a rules file; print every problem with its line (exit 2 if any).

    With ``--config``, destinations are checked against that node's, as ``import`` does.
    """
    known = None if config is None else [d.name for d in settings_or_exit(config).destinations]
    rule_set = _load(path, known)
    console.print(f"{escape(str(path))}: OK, {len(rule_set.rules)} rule(s)")
    if rule_set.rules:
        console.print(_rules_table(rule_set))
    if not any(rule.enabled for rule in rule_set.rules):
        console.print(
            "[yellow]warning:[/yellow] no enabled rule: every study would be not routed; "
            "import refuses such a file"
        )


def _explanation_tree(explanations: list[RuleExplanation]) -> Tree:
    tree = Tree("Rules, in order (the first enabled rule that matches decides)")
    for rx in explanations:
        if rx.chosen:
            state = "[green bold]MATCH, decides[/green bold]"
        elif rx.matched and not rx.enabled:
            state = "[yellow]would match, but disabled[/yellow]"
        elif rx.matched:
            state = "[yellow]matches, but an earlier rule decides[/yellow]"
        else:
            state = "[red]no match[/red]" + ("" if rx.enabled else " [dim](disabled)[/dim]")
        branch = tree.add(f"rule[{rx.index}] [bold]{escape(rx.rule_name)}[/bold]: {state}")
        for sx in rx.series:
            mark = "[green]✓[/green]" if sx.matched else "[red]✗[/red]"
            image = f" (image {sx.instance + 1} of {sx.instances})" if sx.instances > 1 else ""
            uid = escape(sx.series_instance_uid or "(no UID)")
            node = branch.add(f"{mark} series {uid}{image}")
            if not sx.conditions:
                node.add("[dim]no conditions: matches every series[/dim]")
            for c in sx.conditions:
                cmark = "[green]✓[/green]" if c.matched else "[red]✗[/red]"
                node.add(f"{cmark} {c.keyword} {escape(c.condition)}: {escape(c.reason)}")
        if not rx.series:
            branch.add("[dim]the study has no series[/dim]")
    return tree


def _study_attributes(settings: Settings, study_uid: str) -> list[SeriesAttributes]:
    from node.db.models import Study
    from node.routing.attributes import study_series_attributes
    from node.storage import InstanceStore

    with _database(settings) as sessions, sessions() as session:
        study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        if study_id is None:
            err_console.print(f"[red]error:[/red] no study {escape(study_uid)} in the database")
            raise typer.Exit(1)
        store = InstanceStore(settings.storage.data_dir)
        return study_series_attributes(session, store, study_id)


@app.command("test")
def try_rules(
    path: Annotated[
        Path | None,
        typer.Argument(
            exists=True, dir_okay=False, help="Rules file; omitted: the active version."
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="StudyInstanceUID of a stored study.")
    ] = None,
    dicom: Annotated[
        Path | None,
        typer.Option("--file", exists=True, help="A DICOM file, or a folder of them."),
    ] = None,
    calling_ae: Annotated[
        str, typer.Option("--calling-ae", help="CallingAETitle to assume for --file.")
    ] = "",
    config: ConfigOption = None,
) -> None:
    """Show which rule matches a study (--study UID) or DICOM file (--file), and why.

    Exit 0 when a rule routes it, 1 when it would be recorded as not routed. With
    --study or --config, a rules file naming a destination the node lacks is refused.
    """
    from node.routing.attributes import file_series_attributes
    from node.routing.store import seed_text

    if (study is None) == (dicom is None):
        err_console.print("[red]error:[/red] give exactly one of --study UID or --file PATH")
        raise typer.Exit(2)
    needs_settings = path is None or study is not None or config is not None
    settings = _settings(config) if needs_settings else None

    if path is not None:
        # With a configuration, destinations are checked as import and routing do.
        known = None if settings is None else [d.name for d in settings.destinations]
        rule_set, label = _load(path, known), str(path)
    else:
        assert settings is not None
        with _database(settings) as sessions:
            store = _rule_store(sessions, settings)
            try:
                if store.active_version() is None:
                    text, source = seed_text(settings.routing.rules_file)
                    rule_set = store.parse(text, source)
                    label = f"{source} (not imported yet; the node imports it at start)"
                else:
                    version, rule_set = store.active()
                    label = f"active version {version}"
            except RuleError as exc:
                raise _refuse(exc) from None

    try:
        if dicom is not None:
            series = file_series_attributes(dicom, calling_ae)
        else:
            assert settings is not None and study is not None
            series = _study_attributes(settings, study)
    except (OSError, InvalidDicomError, NodeError) as exc:
        err_console.print(f"[red]error:[/red] cannot read: {escape(str(exc))}")
        raise typer.Exit(1) from None

    console.print(f"Rules: {escape(label)}; {len(series)} series")
    console.print(_explanation_tree(explain(rule_set, series)))
    decision = route(rule_set, series)
    if decision is None:
        console.print(
            "[red bold]Not routed:[/red bold] no rule matches; the study would be "
            "recorded as not routed."
        )
        raise typer.Exit(1)
    console.print(
        f"[green bold]Routed[/green bold] by rule [bold]{escape(decision.rule_name)}[/bold]: "
        f"priority {decision.priority.name.lower()}, models {', '.join(decision.models)}, "
        f"destinations {', '.join(decision.destinations) or 'none'}, "
        f"series {', '.join(decision.series_instance_uids)}"
    )


@app.command("list")
def list_versions(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List saved versions, newest first: who saved each, when, and which is active."""

    settings = _settings(config)
    with _database(settings) as sessions:
        versions = _rule_store(sessions, settings).versions()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "version": v.version,
                        "created_at": v.created_at.isoformat(),
                        "created_by": v.created_by,
                        "comment": v.comment,
                        "active": v.active,
                        "sha256": v.sha256,
                    }
                    for v in versions
                ],
                indent=2,
            )
        )
        return
    if not versions:
        console.print("No rules versions yet; the node imports its rules file when it starts.")
        return
    table = Table(box=None, header_style="bold")
    for col in ("Version", "Active", "Saved (UTC)", "By", "Comment"):
        table.add_column(col, overflow="fold")
    for v in versions:
        table.add_row(
            str(v.version),
            "[green]active[/green]" if v.active else "",
            f"{v.created_at:%Y-%m-%d %H:%M:%S}",
            escape(v.created_by),
            escape(v.comment or ""),
        )
    console.print(table)


@app.command("show")
def show(
    version: Annotated[int | None, typer.Argument(help="Version; omitted: the active one.")] = None,
    config: ConfigOption = None,
) -> None:
    """Print the text of a saved version."""

    settings = _settings(config)
    with _database(settings) as sessions:
        store = _rule_store(sessions, settings)
        wanted = version if version is not None else store.active_version()
        if wanted is None:
            err_console.print("[red]error:[/red] no rules version is active")
            raise typer.Exit(1)
        try:
            text = store.text(wanted)
        except RuleError as exc:
            err_console.print(f"[red]error:[/red] {escape(exc.source)}: no such version")
            raise typer.Exit(1) from None
    print(text, end="" if text.endswith("\n") else "\n")


@app.command("import")
def import_rules(
    path: RulesFile,
    comment: Annotated[str | None, typer.Option(help="Why (kept with the version).")] = None,
    by: ByOption = "",
    config: ConfigOption = None,
) -> None:
    """Validate a rules file and save it as the new active version."""

    rule_set = _load(path)
    settings = _settings(config)
    with _database(settings) as sessions:
        try:
            version = _rule_store(sessions, settings).save(
                path.read_text(encoding="utf-8"), by or os_user(), comment
            )
        except RuleError as exc:
            raise _refuse(exc) from None
        AuditTrail(sessions).record(
            cli_user(by), "rules.save", detail=f"version {version} from the command line"
        )
    console.print(
        f"Saved {escape(str(path))} as version {version} ({len(rule_set.rules)} rule(s)); "
        "it is now active."
    )


@app.command("activate")
def activate(
    version: Annotated[int, typer.Argument(help="The version to make active again.")],
    by: ByOption = "",
    config: ConfigOption = None,
) -> None:
    """Roll back to an earlier version (its text is saved again as a new version)."""

    settings = _settings(config)
    with _database(settings) as sessions:
        store = _rule_store(sessions, settings)
        try:
            before = store.active_version()
            new = store.activate(version, by or os_user())
        except RuleError as exc:
            raise _refuse(exc) from None
        if new != before:
            AuditTrail(sessions).record(
                cli_user(by), "rules.activate", detail=f"version {version} -> {new}"
            )
    if new == before:
        console.print(f"Version {version} is already active.")
    else:
        console.print(f"Version {version} is active again, saved as version {new}.")
