"""TOML documents whose errors can point at a line.

``tomllib`` reports syntax errors with a line but forgets positions once parsed.
Validation errors (from pydantic) name a key path such as ``dicom.port``; this
module finds the line that key was written on so an admin sees
``config.toml line 12: dicom.port: ...`` rather than a bare path.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.errors import ConfigError

_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def _unquote(part: str) -> str:
    return part.strip().strip("\"'")


def find_line(text: str, path: Sequence[str | int]) -> int | None:
    """Return the 1-based line on which the key ``path`` is set, if it can be found.

    Array indices in ``path`` refer to ``[[array]]`` tables and are counted.
    A path whose tail is not written literally (a default) returns the line of
    the deepest table that is, or ``None``.
    """
    keys = [p for p in path if isinstance(p, str)]
    indices = [p for p in path if isinstance(p, int)]
    best: int | None = None
    table: list[str] = []
    array_seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _TABLE.match(line)
        if m:
            table = [_unquote(p) for p in m.group(1).split(".")]
            dotted = ".".join(table)
            if line.lstrip().startswith("[["):
                array_seen[dotted] = array_seen.get(dotted, -1) + 1
            if table == keys[: len(table)]:
                wanted = indices[0] if indices else None
                got = array_seen.get(dotted)
                if wanted is None or got is None or got == wanted:
                    best = lineno if best is None or len(table) >= 1 else best
            continue
        k = _KEY.match(line)
        if not k:
            continue
        full = table + [_unquote(p) for p in k.group(1).split(".")]
        dotted_table = ".".join(table)
        if indices and dotted_table in array_seen and array_seen[dotted_table] != indices[0]:
            continue
        if full == keys:
            return lineno
        if full == keys[: len(full)]:
            best = lineno
    return best


def load(path: Path) -> tuple[dict[str, Any], str]:
    """Read a TOML file; a syntax error becomes a :class:`ConfigError` with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from exc
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"TOML syntax error: {exc}"]) from exc


def describe(
    source: str, text: str | None, loc: Sequence[str | int], msg: str, env: str | None = None
) -> str:
    """One problem as ``line N: a.b.c: reason`` (line omitted when unknown).

    ``env`` names the environment variable the value came from: it is blamed
    instead of a line, which would point at a file entry the variable overrode.
    """
    key = ".".join(str(p) for p in loc) or "(document)"
    if env is not None:
        return f"from {env}: {key}: {msg}"
    line = find_line(text, loc) if text is not None else None
    where = f"line {line}: " if line is not None else ""
    return f"{where}{key}: {msg}"
