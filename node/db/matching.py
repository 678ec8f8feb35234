"""SQL matching of one whole item in a text column that holds a separated list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, SQLColumnExpression, or_


def _literal(text: str) -> str:
    """``text`` for a LIKE pattern with escape ``/``: its wildcards match themselves."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def holds_item(column: SQLColumnExpression[Any], value: str, separator: str) -> ColumnElement[bool]:
    """Whether text ``column`` (items joined by ``separator``) holds ``value`` as a whole item.

    A substring match would find CT in OCT, or the UID 1.2.3 in 1.2.34. The escape is
    ``/``: a backslash may be the separator (DICOM multi-values), and it is
    PostgreSQL's default escape.
    """
    item, sep = _literal(value), _literal(separator)
    return or_(
        column == value,
        column.like(f"{item}{sep}%", escape="/"),
        column.like(f"%{sep}{item}", escape="/"),
        column.like(f"%{sep}{item}{sep}%", escape="/"),
    )
