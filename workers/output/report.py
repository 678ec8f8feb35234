"""TID 1500 Measurement Report of the triage, as a Comprehensive 3D SR (PS3.3 A.35.13).

Built by highdicom's `MeasurementReport` inside `Comprehensive3DSR`; no content item is
assembled by hand (STYLE.md rule 5).

One report per study version, whatever number of source series its analysed images
span (many CR readers put each plate in its own series): the triage answers for the
study, and a reader or a PACS rule looking for "the AI report" of a study finds one,
complete, not one partial report per series. TID 1500 allows this: every measurement
group references its own source image (and SEG), and the Current Requested Procedure
Evidence Sequence lists the source images and SEGs grouped by series (PS3.3 C.17.2).
The SR's Series Instance UID derives from the study and the set of analysed series
(`study_series_uid`; for one series the same UID as before), its SOP Instance UID from
the analysed frames, each per model set.

One measurement group per analysed image:

* with the image's lung segment in a SEG: TID 1411 ROI group whose ROI is that
  segment (Referenced Segment: SEG instance, segment number, and the source image
  (frame) it was derived from). TID 1410 would read more naturally for a planar
  image, but highdicom's Referenced Segmentation Frame puts Referenced Frame Number
  and Referenced Segment Number in one reference, which PS3.3 10.4 forbids;
* without one: TID 1501 image-level group referencing the source image.

Either group carries a tracking identifier and UID, the classifier's Algorithm
Identification (TID 4019), the finding as a qualitative evaluation "Pneumonia" =
Present/Absent (SCT), the probability as a numeric measurement (private code
99TRIAGE PNEUMPROB, UCUM "1") that references the source image, and, when the pixel
spacing made it known, the lung area in mm² (SCT Area, finding site Lung) attributed
to the segmenter. Without pixel spacing the area is omitted rather than reported in
pixels: the mask itself is in the SEG. When the only spacing is at the detector
(Imager Pixel Spacing, or a Pixel Spacing equal to it, without an Estimated
Radiographic Magnification Factor: `workers.pixels.DETECTOR_PLANE`), the area is
larger than in the patient by the square of the unknown magnification (some 10 to 30
% for a chest film); it is still reported, as viewers report distances on such
images, but with Measurement Method (TID 300) 99TRIAGE DETPLANE saying so.

The observer is the device (TID 1004) named by the output context. The private
scheme is declared in the Coding Scheme Identification Sequence.

Re-processing the same frames with the same models gives the same SOP Instance UID:
the object replaces the earlier one, and differs from it only in its creation and
content times. A study that gained images gets a report with another UID; the
reports of its earlier versions are then named in the Predecessor Documents
Sequence when the caller passes them (`previous_reports`).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from workers.output import codes
from workers.output.creation import stamp_timezone
from workers.output.errors import OutputError
from workers.output.identity import SERIES, derive_uid, instance_uid, study_series_uid
from workers.output.results import AlgorithmInfo, ImageResult, OutputContext
from workers.output.segmentation import SEGMENT_NUMBER, segment_frame_number
from workers.output.source import header
from workers.pixels import DETECTOR_PLANE, frame_spacing

#: TID 300 Measurement Method of an area from detector-plane spacing (no standard code).
DETECTOR_PLANE_AREA = Code(
    "DETPLANE", codes.PRIVATE_SCHEME, "At detector plane, not corrected for magnification"
)


def build_report(
    results: Sequence[ImageResult],
    classifier: AlgorithmInfo,
    segmenter: AlgorithmInfo | None,
    ctx: OutputContext,
    segmentation: Dataset | Sequence[Dataset] | None,
    *,
    previous_reports: Sequence[Dataset] = (),
) -> Dataset:
    """The SR for the results of one study (any number of its series) and their SEG(s).

    `segmentation` may be one SEG or the list from `build_segmentations` (of several
    series); an image whose lung segment is in none of them gets an image-level group.

    `previous_reports` are the SRs of earlier versions of the study. One with another
    SOP Instance UID (the study gained images since, so the report covers other
    frames) stays in PACS next to this one: it is listed in the Predecessor Documents
    Sequence (PS3.3 C.17.2.3) so a reader sees which report is current. One with
    this report's UID is the report this one replaces, not a predecessor.
    """
    if not results:
        raise OutputError("no results to report")
    if len({r.frame.study_instance_uid for r in results}) != 1:
        raise OutputError("a report covers the results of one study")
    segs = _as_list(segmentation)
    ordered = sorted(results, key=lambda r: (r.frame.sop_instance_uid, r.frame_number))
    models = [classifier.name, classifier.version]
    if segmenter is not None:
        models += [segmenter.name, segmenter.version]
    frames = [r.frame for r in ordered]
    sop_instance_uid = instance_uid(ctx.uid_root, "sr", frames, *models)

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    used_segs: dict[str, Dataset] = {}
    for index, result in enumerate(ordered, start=1):
        found = _find_segment(segs, result)
        if found is not None:
            used_segs[str(found[0].SOPInstanceUID)] = found[0]
        groups.append(
            _group(
                index,
                result=result,
                classifier=classifier,
                segmenter=segmenter,
                ctx=ctx,
                report_uid=sop_instance_uid,
                segment=found,
            )
        )

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=derive_uid(ctx.uid_root, "device", ctx.device_name),
                    name=ctx.device_name,
                    manufacturer_name=ctx.manufacturer,
                    model_name=ctx.device_name,
                ),
            )
        ),
        procedure_reported=codes.PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    evidence = _distinct([header(r.source) for r in ordered]) + list(used_segs.values())
    predecessors = [
        p for p in _distinct(previous_reports) if str(p.SOPInstanceUID) != sop_instance_uid
    ]
    if any(str(p.StudyInstanceUID) != frames[0].study_instance_uid for p in predecessors):
        raise OutputError("a previous report of another study cannot be a predecessor")
    number, description = SERIES["sr"]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=study_series_uid(ctx.uid_root, "sr", frames, *models),
        series_number=number,
        series_description=description,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=ctx.manufacturer,
        manufacturer_model_name=ctx.device_name,
        software_versions=ctx.software_version,
        institution_name=ctx.institution_name,
        is_complete=True,
        is_final=False,  # preliminary: an AI triage result no one has verified
        is_verified=False,
        coding_schemes=[codes.private_coding_scheme()],
        previous_versions=predecessors or None,
    )
    stamp_timezone(sr)
    return sr


def _group(
    index: int,
    *,
    result: ImageResult,
    classifier: AlgorithmInfo,
    segmenter: AlgorithmInfo | None,
    ctx: OutputContext,
    report_uid: str,
    segment: tuple[Dataset, int] | None,
) -> (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """TID 1411 group on the lung segment when there is one, else TID 1501."""
    source = result.source
    frame_numbers = [result.frame_number] if result.is_multiframe else None
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(ctx.uid_root, "tracking", report_uid, result.frame.key),
        identifier=f"Pneumonia triage, image {index}",
    )
    classifier_id = _algorithm_id(classifier)
    measurements = [
        hd.sr.Measurement(
            name=codes.PNEUMONIA_PROBABILITY,
            value=float(result.pneumonia_probability),
            unit=codes.NO_UNITS,
            algorithm_id=classifier_id,
            referenced_images=[
                hd.sr.SourceImageForMeasurement(
                    referenced_sop_class_uid=str(source.SOPClassUID),
                    referenced_sop_instance_uid=str(source.SOPInstanceUID),
                    referenced_frame_numbers=frame_numbers,
                )
            ],
        )
    ]
    if result.lung_area_mm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.AREA,
                value=float(result.lung_area_mm2),
                unit=codes.SQUARE_MILLIMETER,
                method=DETECTOR_PLANE_AREA if _at_detector(result) else None,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUNG)],
                algorithm_id=_algorithm_id(segmenter) if segmenter is not None else None,
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.PNEUMONIA,
            value=codes.PRESENT if result.pneumonia_present else codes.ABSENT,
        )
    ]
    if segment is not None:
        seg, _ = segment
        # TID 1411 with Referenced Segment, not TID 1410 with Referenced Segmentation
        # Frame: highdicom's frame reference carries both Referenced Frame Number and
        # Referenced Segment Number, which PS3.3 10.4 makes mutually exclusive (and
        # dciodvfy reports). The segment reference plus its source image is exact.
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=SEGMENT_NUMBER,
                source_images=[
                    hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=str(source.SOPClassUID),
                        referenced_sop_instance_uid=str(source.SOPInstanceUID),
                        referenced_frame_numbers=frame_numbers,
                    )
                ],
            ),
            finding_type=codes.PNEUMONIA,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.LUNG)],
            algorithm_id=classifier_id,
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.PNEUMONIA,
        algorithm_id=classifier_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
                referenced_frame_numbers=frame_numbers,
            )
        ],
    )


def _at_detector(result: ImageResult) -> bool:
    """Whether the frame's spacing, hence its area, is at the detector plane."""
    return frame_spacing(result.source, result.frame_number)[1] == DETECTOR_PLANE


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification."""
    return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)


def _find_segment(segs: Sequence[Dataset], result: ImageResult) -> tuple[Dataset, int] | None:
    for seg in segs:
        frame = segment_frame_number(seg, result)
        if frame is not None:
            return seg, frame
    return None


def _as_list(segmentation: Dataset | Sequence[Dataset] | None) -> list[Dataset]:
    if segmentation is None:
        return []
    if isinstance(segmentation, Dataset):
        return [segmentation]
    return list(segmentation)


def _distinct(sources: Sequence[Dataset]) -> list[Dataset]:
    seen: dict[str, Dataset] = {}
    for source in sources:
        seen.setdefault(str(source.SOPInstanceUID), source)
    return list(seen.values())
