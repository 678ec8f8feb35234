"""Logging set-up: UIDs and AE titles only, never patient attributes.

pynetdicom's own identifier logging is switched off in node.ingest.scp; its
chatty per-PDU logging is kept at WARNING unless the node runs at DEBUG.
"""

from __future__ import annotations

import json
import logging
import re
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


#: Loggers of libraries that put attribute values in their messages: pydicom's
#: ``warn_and_log`` sends every validation warning ("Invalid value for VR DA:
#: '<birth date>'") to its logger as well as to :mod:`warnings`.
_VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")
_QUOTED = re.compile("'[^']*'|\"[^\"]*\"")


class RedactQuotedValues(logging.Filter):
    """Replace every quoted string in a library's log message by ``'…'``.

    What the message is about (the VR, the length, the tag) stays; the value, which
    may be a patient's name, ID or birth date, does not reach any handler.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _QUOTED.sub("'…'", message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True


def silence_value_warnings() -> None:
    """Keep attribute values (possibly PHI) that libraries quote out of the logs.

    The node and the workers validate what they need themselves; pydicom's
    reading validation is switched off in both (see node.ingest.scp). Warnings that
    quote values are dropped; the same libraries' log records have their quoted
    values redacted (idempotent: safe to call in every process).
    """
    import warnings

    for pattern in _VALUE_QUOTING_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _VALUE_QUOTING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQuotedValues) for f in logger.filters):
            logger.addFilter(RedactQuotedValues())


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
