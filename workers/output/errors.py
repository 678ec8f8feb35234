"""Errors raised while building result objects."""

from __future__ import annotations

from node.errors import NodeError


class OutputError(NodeError):
    """A result object cannot be built from these inputs; the message says why."""


class UnsupportedGeometry(OutputError):
    """The source image's geometry cannot carry a DICOM SEG (e.g. a multi-frame image
    without the functional groups its IOD requires). Send the SR and SC without it."""
