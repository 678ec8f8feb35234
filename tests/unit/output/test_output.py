"""SEG, SR and SC built from real sources: valid on read-back and dciodvfy, deterministic."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.unit.output.conftest import CASES, CLASSIFIER, CTX, PATIENT, SEGMENTER, make_result
from workers.output import (
    SERIES,
    AlgorithmInfo,
    ImageResult,
    OutputError,
    UnsupportedGeometry,
    build_heatmap_image,
    build_report,
    build_segmentation,
    build_segmentations,
    codes,
    derive_uid,
)
from workers.output.identity import series_uid
from workers.result_objects import build_objects

CASE_IDS = [case for case, _, _ in CASES]
STUDY_KEYWORDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyID", "PatientSex")


#: The one case with no SEG: emri_small is an Enhanced MR without functional groups.
NO_SEG_CASES = {"mr-multiframe-no-fg"}


def seg_or_none(case: str, result: ImageResult) -> Dataset | None:
    """The case's SEG; None only for a case that has none (any other refusal fails)."""
    if case in NO_SEG_CASES:
        with pytest.raises(UnsupportedGeometry):
            build_segmentation([result], SEGMENTER, CTX)
        return None
    return build_segmentation([result], SEGMENTER, CTX)


def walk(items: object) -> Iterator[Dataset]:
    for item in items:  # type: ignore[attr-defined]
        yield item
        yield from walk(item.get("ContentSequence", []))


def name_of(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def assert_study_copied(out: Dataset, source: Dataset) -> None:
    for keyword in STUDY_KEYWORDS:
        assert str(out.get(keyword, "")) == str(source.get(keyword, "")), keyword


@pytest.mark.parametrize("case", CASE_IDS)
def test_segmentation_reads_back_valid(case: str, results: Callable, read_back: Callable) -> None:
    result = results(case)
    if case in NO_SEG_CASES:
        with pytest.raises(UnsupportedGeometry):
            build_segmentation([result], SEGMENTER, CTX)
        return
    seg = read_back(build_segmentation([result], SEGMENTER, CTX), f"{case}-seg")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert (seg.SeriesNumber, seg.SeriesDescription) == SERIES["seg"]
    assert_study_copied(seg, result.source)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.LUNG.value
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("lung-unet", "0.3.1")
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == 1
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == result.source.SOPInstanceUID
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    source_ref = derivation.SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == result.source.SOPInstanceUID
    if result.is_multiframe:
        assert int(source_ref.ReferencedFrameNumber) == result.frame_number
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), result.lung_mask)
    measures = seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
    if case in ("cr-no-spacing", "cr-monochrome1"):  # none, and 0\0 respectively
        assert measures is None
    if case == "dx-j2k":
        assert [float(v) for v in measures[0].PixelSpacing] == [0.16, 0.16]


@pytest.mark.parametrize("case", CASE_IDS)
def test_report_reads_back_valid(case: str, results: Callable, read_back: Callable) -> None:
    result = results(case)
    seg = seg_or_none(case, result)
    sr = read_back(build_report([result], CLASSIFIER, SEGMENTER, CTX, seg), f"{case}-sr")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.SeriesNumber, sr.SeriesDescription) == SERIES["sr"]
    assert_study_copied(sr, result.source)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert codes.PRIVATE_SCHEME in schemes
    items = list(walk(sr.ContentSequence))
    groups = [i for i in items if name_of(i) == "Measurement Group"]
    assert len(groups) == 1
    group = list(walk(groups[0].ContentSequence))

    (probability,) = [i for i in group if name_of(i) == "Probability of pneumonia"]
    value = probability.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(0.83)
    assert probability.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99TRIAGE"
    (finding,) = [i for i in group if name_of(i) == "Pneumonia"]
    assert finding.ConceptCodeSequence[0].CodeValue == codes.PRESENT.value
    areas = [i for i in group if name_of(i) == "Area"]
    if result.lung_area_mm2 is None:
        assert areas == []
    else:
        (area,) = areas
        assert float(area.MeasuredValueSequence[0].NumericValue) == pytest.approx(
            result.lung_area_mm2, rel=1e-6
        )
        assert area.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm2"

    refs = [r for i in group if i.ValueType == "IMAGE" for r in i.ReferencedSOPSequence]
    if seg is None:
        # No SEG to point at: no image reference anywhere in the SR may name a segment.
        segment_refs = [
            r.ReferencedSOPInstanceUID
            for item in items
            for r in item.get("ReferencedSOPSequence", [])
            if "ReferencedSegmentNumber" in r
        ]
        assert segment_refs == [], "SR references a segment although no SEG was made"
    source_refs = [r for r in refs if r.ReferencedSOPInstanceUID == result.source.SOPInstanceUID]
    assert source_refs
    if result.is_multiframe:
        assert all(int(r.ReferencedFrameNumber) == result.frame_number for r in source_refs)
    if seg is not None:
        seg_refs = [r for r in refs if r.ReferencedSOPInstanceUID == seg.SOPInstanceUID]
        assert [int(r.ReferencedSegmentNumber) for r in seg_refs] == [1]
        evidence = [
            i.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence
        ]
        assert seg.SOPInstanceUID in evidence
    texts = {str(i.TextValue) for i in group if i.ValueType == "TEXT"}
    assert {"pneumonia-densenet", "1.2.0"} <= texts
    if result.lung_area_mm2 is not None:
        assert {"lung-unet", "0.3.1"} <= texts
    trackers = [i for i in group if name_of(i) == "Tracking Unique Identifier"]
    assert trackers
    device = [i for i in items if name_of(i) == "Device Observer Name"]
    assert device[0].TextValue == CTX.device_name


@pytest.mark.parametrize("case", CASE_IDS)
def test_heatmap_image_reads_back_valid(case: str, results: Callable, read_back: Callable) -> None:
    result = results(case)
    sc = read_back(build_heatmap_image(result, CLASSIFIER, CTX), f"{case}-sc")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (sc.SeriesNumber, sc.SeriesDescription) == SERIES["sc"]
    assert_study_copied(sc, result.source)
    assert sc.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSIS" in sc.ImageComments
    assert sc.PhotometricInterpretation == "RGB"
    pixels = sc.pixel_array
    assert pixels.shape == (result.source.Rows, result.source.Columns, 3)
    corner = pixels[: pixels.shape[0] // 6, : pixels.shape[1] // 2]
    assert (corner == 255).any() and (corner == 0).any()  # the burned-in label
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == result.source.SOPInstanceUID


def test_uids_are_deterministic_and_depend_on_model_version(results: Callable) -> None:
    result = results("cr-no-spacing")
    newer = AlgorithmInfo(SEGMENTER.name, "0.4.0")
    first, again = (build_segmentation([result], SEGMENTER, CTX) for _ in range(2))
    other = build_segmentation([result], newer, CTX)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID

    reports = [build_report([result], CLASSIFIER, s, CTX, first) for s in (SEGMENTER, SEGMENTER)]
    assert reports[0].SOPInstanceUID == reports[1].SOPInstanceUID
    newer_clf = AlgorithmInfo(CLASSIFIER.name, "2.0.0")
    assert build_report([result], newer_clf, SEGMENTER, CTX, first).SOPInstanceUID != (
        reports[0].SOPInstanceUID
    )
    scs = [build_heatmap_image(result, c, CTX) for c in (CLASSIFIER, CLASSIFIER, newer_clf)]
    assert scs[0].SOPInstanceUID == scs[1].SOPInstanceUID != scs[2].SOPInstanceUID
    assert scs[0].SeriesInstanceUID == scs[1].SeriesInstanceUID != scs[2].SeriesInstanceUID
    kinds = {first.SOPInstanceUID, reports[0].SOPInstanceUID, scs[0].SOPInstanceUID}
    assert len(kinds) == 3
    assert all(uid.startswith(CTX.uid_root) for uid in kinds)


def test_derive_uid_is_valid_and_unambiguous() -> None:
    uid = derive_uid(CTX.uid_root, "a" * 200, "b")
    assert len(uid) <= 64
    assert re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*", uid)
    assert derive_uid(CTX.uid_root, "ab", "c") != derive_uid(CTX.uid_root, "a", "bc")
    assert derive_uid("1.2.3.", "x") != derive_uid("1.2.4.", "x")


def test_series_of_radiographs_gets_one_seg_per_image(
    sources: dict[str, Dataset], read_back: Callable
) -> None:
    base = sources["cr-no-spacing"]
    second = copy.deepcopy(base)
    second.SOPInstanceUID = generate_uid(entropy_srcs=["second"])
    second.InstanceNumber = 8
    results = [make_result(base, 1, 0.2), make_result(second, 1, 0.9)]
    results[0] = replace(results[0], lung_mask=np.zeros_like(results[0].lung_mask))
    segs = build_segmentations(results, SEGMENTER, CTX)
    assert len(segs) == 2
    sr = read_back(build_report(results, CLASSIFIER, SEGMENTER, CTX, segs), "series-sr")
    items = list(walk(sr.ContentSequence))
    groups = [i for i in items if name_of(i) == "Measurement Group"]
    assert len(groups) == 2
    findings = sorted(
        i.ConceptCodeSequence[0].CodeMeaning for i in items if name_of(i) == "Pneumonia"
    )
    assert findings == ["Absent", "Present"]
    seg_uids = {
        r.ReferencedSOPInstanceUID
        for i in items
        if i.ValueType == "IMAGE"
        for r in i.ReferencedSOPSequence
        if "ReferencedSegmentNumber" in r
    }
    assert seg_uids == {s.SOPInstanceUID for s in segs}
    for index, seg in enumerate(segs):
        read_back(seg, f"series-seg-{index}")


def test_report_without_segmentation_uses_image_level_groups(
    results: Callable, read_back: Callable
) -> None:
    result = replace(results("dx-j2k"), lung_mask=None)
    sr = read_back(build_report([result], CLASSIFIER, None, CTX, None), "no-seg-sr")
    items = list(walk(sr.ContentSequence))
    assert any(name_of(i) == "Probability of pneumonia" for i in items)
    assert build_segmentations([result], SEGMENTER, CTX) == []


def test_no_phi_in_logs(sources: dict[str, Dataset], caplog: pytest.LogCaptureFixture) -> None:
    source = copy.deepcopy(sources["cr-no-spacing"])
    source.AccessionNumber = "X" * 40  # invalid SH, emptied with a log line
    result = make_result(source, 1)
    with caplog.at_level(logging.DEBUG):
        seg = build_segmentation([result], SEGMENTER, CTX)
        build_report([result], CLASSIFIER, SEGMENTER, CTX, seg)
        build_heatmap_image(result, CLASSIFIER, CTX)
    assert "AccessionNumber" in caplog.text
    assert not seg.AccessionNumber
    for value in [*PATIENT.values(), "X" * 40]:
        assert value not in caplog.text


def _two_series(source: Dataset) -> list[ImageResult]:
    """Two frontal radiographs of one study in separate series (a CR reader's plates)."""
    other = copy.deepcopy(source)
    other.SeriesInstanceUID = generate_uid(entropy_srcs=["second-plate-series"])
    other.SOPInstanceUID = generate_uid(entropy_srcs=["second-plate"])
    other.SeriesNumber, other.InstanceNumber = 2, 1
    return [make_result(source, 1, 0.2), make_result(other, 1, 0.9)]


def test_study_with_several_series_gets_all_objects_and_one_report(
    sources: dict[str, Dataset], read_back: Callable
) -> None:
    results = _two_series(sources["cr-no-spacing"])
    objects = build_objects(results, classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX)
    kinds = sorted(kind for kind, _ in objects)
    assert kinds == ["sc", "sc", "seg", "seg", "sr"]
    by_kind: dict[str, list[Dataset]] = {}
    for kind, ds in objects:
        by_kind.setdefault(kind, []).append(ds)
    sr = read_back(by_kind["sr"][0], "two-series-sr")
    for index, ds in enumerate(by_kind["seg"] + by_kind["sc"]):
        read_back(ds, f"two-series-{index}")

    # The study's one report: a group per image, evidence of both source series and SEGs.
    source_series = {str(r.source.SeriesInstanceUID) for r in results}
    evidence = {
        (str(series.SeriesInstanceUID), str(item.ReferencedSOPInstanceUID))
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {(s, u) for s, u in evidence if s in source_series} == {
        (str(r.source.SeriesInstanceUID), str(r.source.SOPInstanceUID)) for r in results
    }
    assert {u for _, u in evidence} >= {str(s.SOPInstanceUID) for s in by_kind["seg"]}
    items = list(walk(sr.ContentSequence))
    assert len([i for i in items if name_of(i) == "Measurement Group"]) == 2
    assert sr.SeriesInstanceUID not in source_series
    assert sr.StudyInstanceUID == results[0].source.StudyInstanceUID

    # Deterministic per study version, and distinct from the report of either series alone.
    again = build_objects(results, classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX)
    assert [ds.SOPInstanceUID for _, ds in again] == [ds.SOPInstanceUID for _, ds in objects]
    assert by_kind["sr"][0].SeriesInstanceUID == next(
        ds.SeriesInstanceUID for kind, ds in again if kind == "sr"
    )
    alone = build_report(results[:1], CLASSIFIER, SEGMENTER, CTX, by_kind["seg"])
    assert alone.SOPInstanceUID != sr.SOPInstanceUID
    assert alone.SeriesInstanceUID != sr.SeriesInstanceUID
    uids = [str(ds.SOPInstanceUID) for _, ds in objects]
    assert len(set(uids)) == len(uids)


def test_report_series_uid_of_one_source_series_is_unchanged(results: Callable) -> None:
    """Reprocessing after the multi-series change replaces, not duplicates, in PACS."""
    result = results("cr-no-spacing")
    sr = build_report([result], CLASSIFIER, SEGMENTER, CTX, None)
    models = [CLASSIFIER.name, CLASSIFIER.version, SEGMENTER.name, SEGMENTER.version]
    assert sr.SeriesInstanceUID == series_uid(CTX.uid_root, "sr", result.frame, *models)


def test_report_refuses_results_of_several_studies(sources: dict[str, Dataset]) -> None:
    results = _two_series(sources["cr-no-spacing"])
    results[1].source.StudyInstanceUID = generate_uid(entropy_srcs=["another-study"])
    with pytest.raises(OutputError, match="one study"):
        build_report(results, CLASSIFIER, None, CTX, None)
