"""Options and helpers shared by every ``triage-node`` sub-command (one definition each)."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from node.config import Settings, load_settings
from node.errors import ConfigError

err_console = Console(stderr=True)


def os_user() -> str:
    """The operating-system user running the command ("cli" when there is none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def cli_user(by: str = "") -> str:
    """Who made a change from the command line, as the audit trail shows it."""
    return f"cli:{by or os_user()}"[:64]


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (see config.example.toml).",
        envvar="TRIAGE_NODE_CONFIG",
        exists=True,
        dir_okay=False,
    ),
]


def settings_or_exit(path: Path | None) -> Settings:
    """The settings from ``path`` and the environment; exit 2 with every problem if invalid."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
