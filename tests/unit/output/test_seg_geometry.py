"""A SEG a viewer can lay exactly over its source, and a mask that cannot be placed
costs only the SEG, never the report.

The masks here are known rectangles on sources whose rows and columns differ, with
MONOCHROME1 and non-square pixels, so an exchanged axis, a flip or an off-by-one
shows as a mismatch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

from tests.unit.output.conftest import (
    CLASSIFIER,
    CTX,
    SEGMENTER,
    make_result,
    synthetic_cr,
)
from workers.output import ImageResult, build_heatmap_image, build_segmentations
from workers.result_objects import build_objects

ReadBack = Callable[[Dataset, str], Dataset]


def rectangles(rows: int, cols: int) -> np.ndarray:
    """Two "lungs" of known extent, not symmetric in either axis."""
    mask = np.zeros((rows, cols), dtype=bool)
    mask[rows // 5 : rows * 4 // 5, cols // 8 : cols * 3 // 8] = True
    mask[rows // 4 : rows * 3 // 4 + 1, cols // 2 + 3 : cols * 7 // 8] = True
    return mask


def with_rectangles(source: Dataset, frame: int = 1) -> ImageResult:
    result = make_result(source, frame)
    return replace(result, lung_mask=rectangles(int(source.Rows), int(source.Columns)))


def radiograph(name: str, *, orientation: list[str]) -> Dataset:
    """A DX (MONOCHROME1, non-square pixels, rows != columns) that, like some devices'
    output, carries an Image Position/Orientation (Patient) and a Frame of Reference."""
    ds = synthetic_cr()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "DX"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["dx", name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.15, 0.125]
    ds.PatientOrientation = orientation
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["dx-frame-of-reference"])
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-200, 0, 250]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    return ds


def assert_overlays(seg: Dataset, result: ImageResult) -> None:
    """Same pixel grid and mask as the source frame, referencing it."""
    source = result.source
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    reference = derivation.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(seg.pixel_array.astype(bool), result.lung_mask)


def test_radiographs_with_stray_plane_attributes_get_a_seg_each(read_back: ReadBack) -> None:
    pa = radiograph("pa", orientation=["L", "F"])
    lateral = radiograph("lateral", orientation=["A", "F"])
    lateral.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    lateral.InstanceNumber = 8
    results = [with_rectangles(pa), with_rectangles(lateral)]
    objects = build_objects(results, classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX)
    assert sorted(kind for kind, _ in objects) == ["sc", "sc", "seg", "seg", "sr"]
    segs = [ds for kind, ds in objects if kind == "seg"]
    for index, seg in enumerate(segs):
        back = read_back(seg, f"dx-seg-{index}")
        (result,) = [r for r in results if _references(back, r)]
        assert_overlays(back, result)
        # A projection: no 3-D placement, Patient Orientation as the source says.
        assert "FrameOfReferenceUID" not in back
        assert "PlaneOrientationSequence" not in back.SharedFunctionalGroupsSequence[0]
        assert list(back.PatientOrientation) == list(result.source.PatientOrientation)
        measures = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == [0.15, 0.125]  # row, column
    read_back(next(ds for kind, ds in objects if kind == "sr"), "dx-sr")


def _references(seg: Dataset, result: ImageResult) -> bool:
    series = seg.ReferencedSeriesSequence[0]
    return any(
        item.ReferencedSOPInstanceUID == result.source.SOPInstanceUID
        for item in series.ReferencedInstanceSequence
    )


def test_ct_slice_seg_has_the_sources_plane(shared_data: object, read_back: ReadBack) -> None:
    path = f"{shared_data}/dicom/modalities/ct/ELSCINT1_JP2vsJ2K.dcm"
    source = pydicom.dcmread(path)
    result = with_rectangles(source)
    (seg,) = build_segmentations([result], SEGMENTER, CTX)
    back = read_back(seg, "ct-slice-seg")
    assert_overlays(back, result)
    assert back.FrameOfReferenceUID == source.FrameOfReferenceUID
    shared = back.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [float(v) for v in source.ImageOrientationPatient]
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in source.PixelSpacing]
    position = back.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    assert [float(v) for v in position.ImagePositionPatient] == [
        float(v) for v in source.ImagePositionPatient
    ]


def test_slices_sharing_a_position_still_get_segs_and_the_report(
    shared_data: object, read_back: ReadBack
) -> None:
    """Two slices of one series at one position (a repeat): no series SEG can hold
    both, one SEG each does, and the report is made either way."""
    base = pydicom.dcmread(f"{shared_data}/dicom/modalities/mr/MR2_UNCR.dcm")
    repeat = copy.deepcopy(base)
    repeat.SOPInstanceUID = generate_uid(entropy_srcs=["repeat"])
    repeat.InstanceNumber = int(base.get("InstanceNumber") or 1) + 1
    results = [with_rectangles(base), with_rectangles(repeat)]
    objects = build_objects(results, classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX)
    assert sorted(kind for kind, _ in objects) == ["sc", "sc", "seg", "seg", "sr"]
    for index, (kind, ds) in enumerate(objects):
        if kind != "sc":  # the heatmaps are checked elsewhere; 1k RGB is slow here
            read_back(ds, f"repeat-{kind}-{index}")


def test_a_seg_highdicom_refuses_costs_only_the_seg(
    shared_data: object, read_back: ReadBack
) -> None:
    """An MR slice without Slice Thickness (Type 2, seen empty or absent): highdicom
    cannot make its SEG; the report and the heatmap are still made."""
    source = pydicom.dcmread(f"{shared_data}/dicom/modalities/mr/MR2_UNCR.dcm")
    del source.SliceThickness
    objects = build_objects(
        [with_rectangles(source)], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX
    )
    assert sorted(kind for kind, _ in objects) == ["sc", "sr"]
    read_back(next(ds for kind, ds in objects if kind == "sr"), "no-seg-sr")


def test_multiframe_seg_references_only_the_analysed_frame(
    shared_data: object, read_back: ReadBack
) -> None:
    """Frames of one source at one position (echoes, phases): the SEG frame names the
    analysed one, not every frame there."""
    path = f"{shared_data}/dicom/modalities/multi-frame/eCT_Supplemental.dcm"
    source = pydicom.dcmread(path)
    per_frame = source.PerFrameFunctionalGroupsSequence
    first = per_frame[0].PlanePositionSequence[0].ImagePositionPatient
    per_frame[1].PlanePositionSequence[0].ImagePositionPatient = list(first)
    result = with_rectangles(source, frame=2)
    (seg,) = build_segmentations([result], SEGMENTER, CTX)
    back = read_back(seg, "same-position-seg")
    assert_overlays(back, result)
    derivation = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    frames = [int(r.ReferencedFrameNumber) for r in derivation.SourceImageSequence]
    assert frames == [2]


def test_heatmap_of_non_square_pixels_keeps_their_aspect(read_back: ReadBack) -> None:
    """The SC has no pixel spacing: Pixel Aspect Ratio keeps a 0.15 x 0.125 mm pixel
    from being shown square, i.e. the heatmap distorted against its image."""
    result = with_rectangles(radiograph("pa", orientation=["L", "F"]))
    sc = read_back(build_heatmap_image(result, CLASSIFIER, CTX), "non-square-sc")
    assert [int(v) for v in sc.PixelAspectRatio] == [6, 5]  # row : column
    assert (sc.Rows, sc.Columns) == (result.source.Rows, result.source.Columns)
    square = read_back(build_heatmap_image(make_result(synthetic_cr(), 1), CLASSIFIER, CTX), "sq")
    assert "PixelAspectRatio" not in square


def test_building_objects_leaves_the_source_untouched(sources: dict[str, Dataset]) -> None:
    """The source dataset serves every object of the study: what highdicom writes into
    its input (a Spacing Between Slices in the shared Pixel Measures) must not reach it."""
    source = sources["ct-multiframe"]
    before = copy.deepcopy(source)
    build_objects(
        [with_rectangles(source, frame=2)], classifier=CLASSIFIER, segmenter=SEGMENTER, ctx=CTX
    )
    assert source == before


def test_one_frame_seg_states_no_slice_spacing_its_source_does_not(
    shared_data: object, read_back: ReadBack
) -> None:
    """From one position highdicom guesses 1.0 mm; only a spacing the source states
    (MR2_UNCR: 6.6 mm) belongs in the SEG."""
    for name, stated in (("ct/ELSCINT1_JP2vsJ2K.dcm", None), ("mr/MR2_UNCR.dcm", 6.6)):
        source = pydicom.dcmread(f"{shared_data}/dicom/modalities/{name}")
        (seg,) = build_segmentations([with_rectangles(source)], SEGMENTER, CTX)
        back = read_back(seg, f"spacing-{name.split('/')[0]}")
        measures = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = measures.get("SpacingBetweenSlices")
        assert (None if spacing is None else float(spacing)) == stated, name
