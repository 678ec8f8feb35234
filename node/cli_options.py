"""Options and helpers shared by every ``triage-node`` sub-command (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from node.config import Settings, load_settings
from node.errors import ConfigError

err_console = Console(stderr=True)

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
