"""``triage-node users``: create, list, disable web accounts and set their passwords."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from node.cli_options import ConfigOption, cli_user, settings_or_exit
from node.db.models import Role
from node.users.accounts import AccountError, Accounts
from node.web.audit import AuditTrail

app = typer.Typer(help="Web users and their roles (radiologist, admin).", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@contextmanager
def _accounts(config: Path | None) -> Iterator[tuple[Accounts, AuditTrail]]:
    from node.db import migrate
    from node.db.engine import make_engine, make_sessionmaker

    settings = settings_or_exit(config)
    engine = make_engine(settings.database_url)
    try:
        if settings.database.auto_upgrade:
            migrate.upgrade(engine)
        elif not migrate.is_up_to_date(engine):
            err_console.print("[red]error:[/red] schema out of date; run 'triage-node db upgrade'")
            raise typer.Exit(1)
        sessions = make_sessionmaker(engine)
        yield Accounts(sessions), AuditTrail(sessions)
    finally:
        engine.dispose()


PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


def _read_password(password_stdin: bool) -> str:
    """From standard input, or asked twice (hidden)."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@contextmanager
def _refused() -> Iterator[None]:
    """An AccountError (name taken, weak password) ends the command with its reason."""
    try:
        yield
    except AccountError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option(help="radiologist or admin.")] = Role.RADIOLOGIST,
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Create a user; asks for the password twice (hidden) unless --password-stdin."""
    password = _read_password(password_stdin)
    with _accounts(config) as (accounts, audit):
        with _refused():
            account = accounts.add(name, password, role)
        audit.record(cli_user(), "user.add", detail=f"{account.name} as {account.role}")
    console.print(f"user [bold]{escape(account.name)}[/bold] added as {account.role}")


@app.command("password")
def password(
    name: str,
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Set a new password for a user; their open sessions end at once."""
    new = _read_password(password_stdin)
    with _accounts(config) as (accounts, audit):
        with _refused():
            found = accounts.set_password(name, new)
        if found:
            audit.record(cli_user(), "user.password", detail=name)
    if not found:
        err_console.print(f"[red]error:[/red] no user {escape(repr(name))}")
        raise typer.Exit(1)
    console.print(f"password of [bold]{escape(name)}[/bold] changed; their sessions ended")


@app.command("list")
def list_users(config: ConfigOption = None) -> None:
    """Users with their role and whether they may log in."""
    with _accounts(config) as (accounts, _):
        rows = accounts.list()
    table = Table("Name", "Role", "Active", "Created (UTC)")
    for a in rows:
        table.add_row(
            escape(a.name), a.role, "yes" if a.active else "no", f"{a.created_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)


@app.command("disable")
def disable(name: str, config: ConfigOption = None) -> None:
    """Stop a user from logging in; their sessions end now, also if enabled again."""
    with _accounts(config) as (accounts, audit):
        found = accounts.set_active(name, False)
        if found:
            audit.record(cli_user(), "user.disable", detail=name)
    if not found:
        err_console.print(f"[red]error:[/red] no user {escape(repr(name))}")
        raise typer.Exit(1)
    console.print(f"user [bold]{escape(name)}[/bold] disabled")


@app.command("enable")
def enable(name: str, config: ConfigOption = None) -> None:
    """Allow a disabled user to log in again."""
    with _accounts(config) as (accounts, audit):
        found = accounts.set_active(name, True)
        if found:
            audit.record(cli_user(), "user.enable", detail=name)
    if not found:
        err_console.print(f"[red]error:[/red] no user {escape(repr(name))}")
        raise typer.Exit(1)
    console.print(f"user [bold]{escape(name)}[/bold] enabled")
