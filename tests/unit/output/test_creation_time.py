"""Creation and content times can be placed on the UTC time line by any reader."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydicom.dataset import Dataset

from tests.unit.output.conftest import CLASSIFIER, CTX, SEGMENTER, make_result, synthetic_cr
from workers.result_objects import build_objects


@pytest.fixture
def worker_in_india(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's local clock at UTC+05:30 (POSIX TZ: no zoneinfo needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("worker_in_india")
def test_times_carry_the_offset_of_the_clock_that_made_them(
    read_back: Callable[[Dataset, str], Dataset],
) -> None:
    objects = build_objects(
        [make_result(synthetic_cr(), 1)], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX
    )
    now = datetime.now(UTC)
    for kind, ds in objects:
        back = read_back(ds, f"timezone-{kind}")
        assert back.TimezoneOffsetFromUTC == "+0530", kind
        for date, clock in (
            ("InstanceCreationDate", "InstanceCreationTime"),
            ("ContentDate", "ContentTime"),
        ):
            local = datetime.strptime(
                f"{back[date].value}{str(back[clock].value)[:6]}", "%Y%m%d%H%M%S"
            )
            utc = local.replace(tzinfo=UTC) - timedelta(hours=5, minutes=30)
            assert abs(utc - now) < timedelta(minutes=2), f"{kind} {clock}"
