"""Logging set-up: UIDs and AE titles only, never patient attributes.

pynetdicom's own identifier logging is switched off in node.ingest.scp; its
chatty per-PDU logging is kept at WARNING unless the node runs at DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: Library warnings that quote DICOM values (patient names, dates): never shown or logged.
#: highdicom warns "The string "<PatientName>" is unlikely to represent ... a person name".
_VALUE_QUOTING_WARNINGS = (
    r"The string .* is unlikely to represent the intended person name",
    r"Invalid value for VR",
    r"The value length .* exceeds the maximum length",
)


def silence_value_warnings() -> None:
    """Drop warnings that would copy attribute values (possibly PHI) into logs.

    The node and the workers validate what they need themselves; pydicom's
    reading validation is switched off in both (see node.ingest.scp).
    """
    import warnings

    for pattern in _VALUE_QUOTING_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    silence_value_warnings()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    library_level = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("pynetdicom", "pydicom", "alembic", "sqlalchemy", "uvicorn.access"):
        logging.getLogger(name).setLevel(library_level)
