"""Re-processing replaces: same UIDs, same content, only the creation times move on.

Result UIDs do not depend on the study version (README "Results back to PACS"), so a
destination receives a re-processed object under the SOP Instance UID it already
holds. That is a replacement only if nothing but the creation and content times
differ, and those do differ, so the replacement is visible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.unit.output.conftest import CASES, CLASSIFIER, CTX, SEGMENTER, make_result
from workers.output import build_report
from workers.result_objects import build_objects

#: What a re-build may change: when the object and its content were made (PS3.3
#: C.12.1, C.7.6.1, C.8.6.1, C.17.2, Contributing Equipment's contribution time).
TIMES = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "ContributionDateTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    }
)


def _elements(ds: Dataset, path: str = "") -> Iterator[tuple[str, str]]:
    for element in ds:
        where = f"{path}{element.keyword or element.tag}"
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _elements(item, f"{where}[{index}].")
        elif element.keyword not in TIMES and element.keyword != "PixelData":
            yield where, str(element.value)


@pytest.mark.parametrize("case", ["cr-monochrome1", "ct-multiframe", "dx-j2k"])
def test_rebuilt_objects_differ_only_in_their_times(
    case: str, sources: dict[str, Dataset], read_back: Callable[[Dataset, str], Dataset]
) -> None:
    frame = {c: f for c, _, f in CASES}[case]
    result = make_result(sources[case], frame)
    first, again = (
        build_objects([result], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX)
        for _ in range(2)
    )
    assert [kind for kind, _ in first] == ["seg", "sr", "sc"]
    for (kind, old), (_, new) in zip(first, again, strict=True):
        assert old.SOPInstanceUID == new.SOPInstanceUID
        changed = {where for where, _ in set(_elements(old)) ^ set(_elements(new))}
        assert changed == set(), f"{kind} re-built with other content: {sorted(changed)}"
        assert old.get("PixelData") == new.get("PixelData"), kind
        back = read_back(new, f"rebuilt-{case}-{kind}")
        # The replacement is visible: when this instance and its content were made.
        for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate"):
            assert back.get(keyword), f"{kind} lacks {keyword}"


def test_report_of_a_grown_study_names_the_report_it_supersedes(
    sources: dict[str, Dataset], read_back: Callable[[Dataset, str], Dataset]
) -> None:
    """Version 2 of a study that gained an image: its report covers other frames, so it
    has another UID and the version 1 report stays in PACS; the new one says it
    supersedes it (Predecessor Documents Sequence), a re-run of the same frames does not."""
    first = make_result(sources["cr-no-spacing"], 1)
    late = copy.deepcopy(sources["cr-no-spacing"])
    late.SOPInstanceUID = generate_uid(entropy_srcs=["late-arrival"])
    late.InstanceNumber = 8
    v1 = build_report([first], CLASSIFIER, None, CTX, None)

    objects = build_objects(
        [first, make_result(late, 1)],
        classifier=CLASSIFIER,
        segmenter=None,
        ctx=CTX,
        previous_reports=[v1],
    )
    (v2,) = [ds for kind, ds in objects if kind == "sr"]
    assert v2.SOPInstanceUID != v1.SOPInstanceUID
    back = read_back(v2, "v2-sr")
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == v1.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == v1.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == [v1.SOPInstanceUID]

    rerun = build_report([first], CLASSIFIER, None, CTX, None, previous_reports=[v1, v2])
    assert rerun.SOPInstanceUID == v1.SOPInstanceUID
    (study,) = read_back(rerun, "rerun-sr").PredecessorDocumentsSequence
    uids = [
        i.ReferencedSOPInstanceUID
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    ]
    assert uids == [v2.SOPInstanceUID]  # never itself
