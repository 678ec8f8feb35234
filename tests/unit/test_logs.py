"""No PHI in logs: values libraries quote in their own log records are redacted."""

from __future__ import annotations

import logging
import warnings

import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

from node.logs import RedactQuotedValues, silence_value_warnings

BIRTH_DATE = "19XX-0704-secret"
NAME = "Smith^Johnathan=" + "x" * 80


@pytest.fixture
def warn_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom validating as by default: warn, and log the warning (the SCP sets both
    modes to IGNORE process-wide when it is imported, as other tests do first)."""
    for mode in ("_reading_validation_mode", "_writing_validation_mode"):
        monkeypatch.setattr(pydicom_config.settings, mode, pydicom_config.WARN)


@pytest.mark.usefixtures("warn_mode")
def test_pydicom_validation_log_records_keep_no_value(caplog: pytest.LogCaptureFixture) -> None:
    silence_value_warnings()
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = Dataset()
        ds.PatientBirthDate = BIRTH_DATE  # "Invalid value for VR DA: '<value>'."
        ds.PatientName = NAME
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")]
    assert any(m.startswith("Invalid value for VR DA") for m in messages)  # still reported
    assert BIRTH_DATE not in caplog.text and "Smith" not in caplog.text


def test_filter_is_installed_once_and_keeps_what_the_message_is_about() -> None:
    silence_value_warnings()
    silence_value_warnings()
    for name in ("pydicom", "highdicom"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RedactQuotedValues) for f in filters) == 1
    record = logging.LogRecord(
        "highdicom",
        logging.WARNING,
        __file__,
        1,
        'The string "%s" is unlikely %s',
        ("Doe^J", 7),
        None,
    )
    assert RedactQuotedValues().filter(record)
    assert record.getMessage() == "The string '…' is unlikely 7"
