"""DICOM SEG of the lung mask on the source image's geometry (PS3.3 A.51).

Built by `highdicom.seg.Segmentation`: BINARY, one segment "Lung" (SCT 39607008, both
lungs; the model predicts one mask and we do not split it into left and right),
category Anatomical Structure (CID 7150), with our model in the segment's Algorithm
Identification Sequence (C.8.20.2.1) and references to the analysed frames in the
Derivation Image and Source Image sequences (C.7.6.16.2.6).

Geometry decisions (highdicom 0.28 behaviour, checked against its source):

* **Projection radiographs** (CR, DX and the like, or any source without Image
  Position/Orientation (Patient)) have no patient coordinate system; highdicom then
  allows exactly one source frame per SEG, so there is one SEG per source instance
  (`build_segmentations`). A Frame of Reference UID on such an image is not copied,
  nor an Image Position/Orientation (Patient) some devices write although the CR/DX
  IODs have no Image Plane module: with no plane geometry to relate them to,
  highdicom would try to compute plane positions that do not exist.
* **Pixel spacing** is carried into the Pixel Measures macro when the source has a
  usable one; an absent or non-positive Pixel Spacing (seen in the wild as
  ``0\\0``) is left out rather than copied, which the SEG IOD allows when there is
  no Frame of Reference.
* **Multi-frame sources** with functional groups: the analysed frames are placed by
  their Plane Position (Patient) so only those frames are in the SEG and each
  references its source frame by Referenced Frame Number. A multi-frame source
  without the functional groups its IOD requires cannot be mapped frame by frame,
  and `UnsupportedGeometry` is raised (send SR and SC without a SEG).
* Empty masks are kept (``omit_empty_frames=False``): "the model found no lung" is
  a result, and the SR references the frame either way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalIntraOralXRayImageStorageForPresentation,
    DigitalIntraOralXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
)

from workers.output import codes
from workers.output.creation import stamp_timezone
from workers.output.errors import OutputError, UnsupportedGeometry
from workers.output.identity import SERIES, derive_uid, instance_uid, series_uid
from workers.output.results import AlgorithmInfo, ImageResult, OutputContext
from workers.output.source import header

SEGMENT_NUMBER = 1
#: Longest LO value (PS3.5 6.2).
_LO_MAX = 64

#: Projection radiography SOP Classes (CR, DX, MG, IO; PS3.4 B.5), never 3-D placed.
PROJECTION_SOP_CLASSES: Final = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        DigitalMammographyXRayImageStorageForPresentation,
        DigitalMammographyXRayImageStorageForProcessing,
        DigitalIntraOralXRayImageStorageForPresentation,
        DigitalIntraOralXRayImageStorageForProcessing,
    }
)
#: What a source without plane geometry must not pass on to highdicom.
_PATIENT_GEOMETRY: Final = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)


def build_segmentations(
    results: Sequence[ImageResult], algorithm: AlgorithmInfo, ctx: OutputContext
) -> list[Dataset]:
    """All SEGs for the results of one source series, as few as the geometry allows.

    One SEG per series when the sources have patient geometry and are single-frame;
    otherwise one per source instance (see module notes). Results without a mask
    are skipped; no masks at all gives an empty list.
    """
    groups: dict[str, list[ImageResult]] = defaultdict(list)
    for result in results:
        if result.lung_mask is None:
            continue
        shared = not result.is_multiframe and _has_plane_geometry(result.source)
        key = result.frame.series_instance_uid if shared else result.frame.sop_instance_uid
        groups[key].append(result)
    return [build_segmentation(group, algorithm, ctx) for _, group in sorted(groups.items())]


def build_segmentation(
    results: Sequence[ImageResult], algorithm: AlgorithmInfo, ctx: OutputContext
) -> Dataset:
    """One SEG of the lung masks of `results` (one source series), via highdicom.

    Raises `OutputError` if the results need more than one SEG (use
    `build_segmentations`) or have no mask, `UnsupportedGeometry` if the source's
    frames cannot be placed.
    """
    masked = [r for r in results if r.lung_mask is not None]
    if not masked:
        raise OutputError("no lung mask among the results")
    if len({r.frame.series_instance_uid for r in masked}) != 1:
        raise OutputError("a SEG covers the results of one source series")
    masked.sort(key=lambda r: (_instance_order(r.source), r.frame.sop_instance_uid, r.frame_number))
    for r in masked:
        assert r.lung_mask is not None
        if r.lung_mask.shape != (int(r.source.Rows), int(r.source.Columns)):
            raise OutputError(
                f"mask shape {r.lung_mask.shape} is not the source frame's "
                f"sop_instance_uid={r.frame.sop_instance_uid}"
            )
    sources = _source_views(masked)
    array = np.stack([np.asarray(r.lung_mask, dtype=bool) for r in masked])
    plane_positions = _plane_positions(masked) if masked[0].is_multiframe else None

    models = (algorithm.name, algorithm.version)
    frames = [r.frame for r in masked]
    sop_instance_uid = instance_uid(ctx.uid_root, "seg", frames, *models)
    number, description = SERIES["seg"]
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label="Lung",
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.LUNG,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm),
        tracking_uid=derive_uid(ctx.uid_root, "segment-tracking", sop_instance_uid, "1"),
        tracking_id="lung",
    )
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=series_uid(ctx.uid_root, "seg", frames[0], *models),
            series_number=number,
            series_description=description,
            sop_instance_uid=sop_instance_uid,
            instance_number=_instance_number(masked),
            manufacturer=ctx.manufacturer,
            manufacturer_model_name=ctx.device_name,
            software_versions=ctx.software_version,
            device_serial_number=ctx.device_name,
            institution_name=ctx.institution_name,
            content_label="LUNG",
            content_description=f"Lung mask by {algorithm.name} {algorithm.version}"[:64],
            plane_positions=plane_positions,
            omit_empty_frames=False,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom reads what it needs from the source and fails on what it lacks
        # (e.g. AttributeError for a missing Slice Thickness): these inputs, not a bug.
        raise OutputError(
            f"highdicom refused the segmentation: {type(exc).__name__}: {exc}"
        ) from exc
    _fix_dimension_organization_uid(
        seg, derive_uid(ctx.uid_root, "dimension-organization", sop_instance_uid)
    )
    if plane_positions is not None:
        _keep_analysed_source_frames(seg, masked)
    _drop_guessed_slice_spacing(seg, [r.source for r in masked])
    stamp_timezone(seg)
    if "FrameOfReferenceUID" not in seg:
        # General Image module, Type 2C: required without patient geometry (PS3.3
        # C.7.6.1.1.1); highdicom leaves it out, the source's value is the SEG's.
        seg.PatientOrientation = _patient_orientation(masked[0].source)
    return seg


def _keep_analysed_source_frames(seg: Dataset, results: Sequence[ImageResult]) -> None:
    """Let each SEG frame of a multi-frame source reference only the frame it was made from.

    highdicom finds a SEG frame's source frames by plane position, so when several
    frames of the source share one (echoes, phases, repeats) every one of them is
    referenced, and a viewer cannot tell which the mask belongs to (PS3.3
    C.7.6.16.2.6). The analysed frame at that position is the one.
    """
    analysed: dict[tuple[float, ...], set[int]] = defaultdict(set)
    for result in results:
        analysed[_source_position(result)].add(result.frame_number)
    for item in seg.PerFrameFunctionalGroupsSequence:
        if "PlanePositionSequence" not in item or "DerivationImageSequence" not in item:
            continue
        position = tuple(
            round(float(v), 4) for v in item.PlanePositionSequence[0].ImagePositionPatient
        )
        frames = analysed.get(position)
        if not frames:
            continue
        for derivation in item.DerivationImageSequence:
            refs = derivation.SourceImageSequence
            kept = [r for r in refs if set(_ints(r.get("ReferencedFrameNumber", []))) & frames]
            if kept and len(kept) < len(refs):
                derivation.SourceImageSequence = kept


def _source_position(result: ImageResult) -> tuple[float, ...]:
    """Image Position (Patient) of a multi-frame source's analysed frame, rounded."""
    item = result.source.PerFrameFunctionalGroupsSequence[result.frame_number - 1]
    if "PlanePositionSequence" not in item:
        item = result.source.SharedFunctionalGroupsSequence[0]
    position = item.PlanePositionSequence[0].ImagePositionPatient
    return tuple(round(float(v), 4) for v in position)


def _drop_guessed_slice_spacing(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """Leave out a Spacing Between Slices highdicom made up for a one-frame SEG.

    highdicom derives it from the frames' positions, and from a single position it
    answers 1.0 mm: a spacing no source stated, which a viewer building a volume from
    the SEG would use. It is Type 3 in the Pixel Measures macro (PS3.3 C.7.6.16.2.1).
    """
    if int(seg.NumberOfFrames) != 1 or any(_states_slice_spacing(s) for s in sources):
        return
    for item in seg.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence", []):
        if "SpacingBetweenSlices" in item:
            del item.SpacingBetweenSlices


def _states_slice_spacing(source: Dataset) -> bool:
    """Whether the source gives a Spacing Between Slices, at the root or in its groups."""
    if "SpacingBetweenSlices" in source:
        return True
    for group in source.get("SharedFunctionalGroupsSequence", []):
        for measures in group.get("PixelMeasuresSequence", []):
            if "SpacingBetweenSlices" in measures:
                return True
    return False


def _fix_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    """Replace highdicom's random Dimension Organization UID by a derived one.

    highdicom draws a new UID on every build, so re-processing would send a SEG under
    the same SOP Instance UID whose content differs in more than its creation time
    (STYLE.md rule 6). The UID only ties the Dimension Index Sequence to the Dimension
    Organization Sequence (PS3.3 C.7.6.17); both get the derived one.
    """
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


def algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence for a model (PS3.3 C.8.20.2.1, CID 7162).

    Algorithm Name and Version are LO (PS3.5 6.2: 64 characters), which highdicom does
    not check; a longer one would make an invalid SEG, and cutting it would name
    another model, so the SEG is refused (the SR, whose TEXT items take any length,
    still names the model).
    """
    for what, value in (("name", algorithm.name), ("version", algorithm.version)):
        if len(value) > _LO_MAX:
            raise OutputError(f"algorithm {what} is longer than {_LO_MAX} characters (LO)")
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.algorithm_family(algorithm.family),
        version=algorithm.version,
    )


def segment_frame_number(seg: Dataset, result: ImageResult) -> int | None:
    """1-based SEG frame holding the lung segment of `result`'s source frame, if any.

    Read from each frame's Derivation Image Sequence (PS3.3 C.7.6.16.2.6); a
    single-frame source is matched without a Referenced Frame Number.
    """
    if str(seg.StudyInstanceUID) != result.frame.study_instance_uid:
        return None
    shared = seg.SharedFunctionalGroupsSequence[0]
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        # Either macro may sit in the shared or the per-frame item (PS3.3 C.7.6.16).
        segment = _macro(item, shared, "SegmentIdentificationSequence")
        if int(segment[0].ReferencedSegmentNumber) != SEGMENT_NUMBER:
            continue
        for derivation in _macro(item, shared, "DerivationImageSequence"):
            for ref in derivation.get("SourceImageSequence", []):
                if str(ref.ReferencedSOPInstanceUID) != result.frame.sop_instance_uid:
                    continue
                frame_numbers = ref.get("ReferencedFrameNumber")
                if frame_numbers is None:
                    if not result.is_multiframe or int(result.source.NumberOfFrames) == 1:
                        return index
                    continue
                if result.frame_number in _ints(frame_numbers):
                    return index
    return None


def _macro(item: Dataset, shared: Dataset, keyword: str) -> list[Dataset]:
    """A functional group macro from the per-frame item, else the shared one."""
    for group in (item, shared):
        if keyword in group:
            return list(group[keyword].value)
    return []


def _ints(value: object) -> list[int]:
    """An IS/US value that may be single or multi-valued, as ints."""
    if isinstance(value, int | str):
        return [int(value)]
    return [int(v) for v in value]  # type: ignore[attr-defined]


def _has_plane_geometry(source: Dataset) -> bool:
    """Whether the source is placed in the patient coordinate system (PS3.3 C.7.6.2).

    Never for a projection radiograph: its IODs have no Image Plane module (PS3.3
    A.2, A.26), so an Image Position/Orientation (Patient) some devices still write
    places nothing, and highdicom would build a 3-D SEG from it (or fail: such images
    have no Slice Thickness). The SEG then overlays by pixel, like any viewer does.
    """
    return (
        str(source.get("SOPClassUID", "")) not in PROJECTION_SOP_CLASSES
        and "FrameOfReferenceUID" in source
        and "ImagePositionPatient" in source
        and "ImageOrientationPatient" in source
    )


def _source_views(results: Sequence[ImageResult]) -> list[Dataset]:
    """Header-only copies of the distinct sources, adjusted as the module notes say."""
    views: dict[str, Dataset] = {}
    for result in results:
        uid = result.frame.sop_instance_uid
        if uid in views:
            continue
        source = result.source
        view = header(source)
        if not result.is_multiframe and not _has_plane_geometry(source):
            for keyword in _PATIENT_GEOMETRY:
                if keyword in view:
                    delattr(view, keyword)
        if "PixelSpacing" in view and not _usable_spacing(view.PixelSpacing):
            del view.PixelSpacing
        views[uid] = view
    if len(views) > 1 and not all(_has_plane_geometry(v) for v in views.values()):
        raise OutputError(
            "sources without patient geometry need one SEG per instance; use build_segmentations"
        )
    if any(r.is_multiframe for r in results) and len(views) > 1:
        raise OutputError("a SEG of a multi-frame source covers that one instance")
    return list(views.values())


def _usable_spacing(value: object) -> bool:
    try:
        values = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return len(values) == 2 and all(v > 0 for v in values)


def _plane_positions(results: Sequence[ImageResult]) -> list[hd.PlanePositionSequence]:
    """Plane Position (Patient) of each analysed frame of a multi-frame source.

    Raises `UnsupportedGeometry` when the source lacks the functional groups
    (PS3.3 C.7.6.16) that say where its frames are.
    """
    source = results[0].source
    uid = results[0].frame.sop_instance_uid
    try:
        shared = source.SharedFunctionalGroupsSequence[0]
        per_frame = source.PerFrameFunctionalGroupsSequence
        if "FrameOfReferenceUID" not in source or "PlaneOrientationSequence" not in shared:
            raise AttributeError("no frame of reference or shared plane orientation")
        positions = []
        for result in results:
            item = per_frame[result.frame_number - 1]
            position = (
                item.PlanePositionSequence
                if "PlanePositionSequence" in item
                else shared.PlanePositionSequence
            )[0].ImagePositionPatient
            positions.append(
                hd.PlanePositionSequence(
                    coordinate_system=hd.CoordinateSystemNames.PATIENT,
                    image_position=[float(v) for v in position],
                )
            )
    except (AttributeError, IndexError, KeyError) as exc:
        raise UnsupportedGeometry(
            f"multi-frame source sop_instance_uid={uid} has no usable functional groups "
            f"to place its frames ({exc})"
        ) from exc
    return positions


def _patient_orientation(source: Dataset) -> list[str] | None:
    """The source's Patient Orientation if it is a valid pair, else empty (Type 2C)."""
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(value):
        return None
    return [str(value[0]), str(value[1])]


def _instance_order(source: Dataset) -> int:
    value = source.get("InstanceNumber")
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _instance_number(results: Sequence[ImageResult]) -> int:
    """The source's Instance Number for a one-instance SEG, else 1."""
    uids = {r.frame.sop_instance_uid for r in results}
    if len(uids) == 1:
        return max(1, _instance_order(results[0].source))
    return 1
