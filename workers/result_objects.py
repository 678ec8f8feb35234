"""Turning a study's analysis into the DICOM objects that go back to PACS.

One SR per study version (TID 1500), covering every analysed series of the study,
SEGs per source series as the source geometry allows, and a heatmap image per
analysed frame. They are written to the node's store under
``results/`` (directly, or uploaded when the worker has no shared disk) with
their deterministic SOP Instance UIDs, so a re-run overwrites the same files and
the export rows are re-armed rather than duplicated.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset

from node.config import ResultsSettings
from workers.output import (
    AlgorithmInfo,
    ImageResult,
    OutputContext,
    OutputError,
    build_heatmap_image,
    build_report,
    build_segmentations,
)
from workers.storage import WorkerStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResultObject:
    kind: str  # seg | sr | sc
    sop_instance_uid: str
    sop_class_uid: str
    path: str  # relative to the data directory


def output_context(settings: ResultsSettings, software_version: str) -> OutputContext:
    return OutputContext(
        uid_root=settings.uid_root,
        device_name=settings.device_name,
        software_version=software_version,
        institution_name=settings.institution_name,
    )


def build_objects(
    results: Sequence[ImageResult],
    *,
    classifier: AlgorithmInfo | None,
    segmenter: AlgorithmInfo | None,
    ctx: OutputContext,
    previous_reports: Sequence[Dataset] = (),
) -> list[tuple[str, Dataset]]:
    """(kind, dataset) for every object the results call for.

    `previous_reports`: the SRs sent for earlier versions of the study (`build_report`).
    """
    objects: list[tuple[str, Dataset]] = []
    segs: list[Dataset] = []
    if segmenter is not None:
        by_series: dict[str, list[ImageResult]] = defaultdict(list)
        for r in results:
            if r.lung_mask is not None:
                by_series[str(r.source.SeriesInstanceUID)].append(r)
        for series_results in by_series.values():
            segs.extend(_segmentations(series_results, segmenter, ctx))
        objects.extend(("seg", seg) for seg in segs)
    if classifier is not None:
        report = build_report(
            results, classifier, segmenter, ctx, segs or None, previous_reports=previous_reports
        )
        objects.append(("sr", report))
        objects.extend(
            ("sc", build_heatmap_image(r, classifier, ctx))
            for r in results
            if r.heatmap is not None
        )
    return objects


def _segmentations(
    results: Sequence[ImageResult], segmenter: AlgorithmInfo, ctx: OutputContext
) -> list[Dataset]:
    """The SEGs of one source series: one for the series if its geometry allows, else
    one per instance, leaving out (with a log line) an instance whose mask cannot be
    placed, e.g. an enhanced multi-frame without functional groups, or slices of one
    series that share a position. The SR and the heatmaps still report the finding:
    a mask that cannot be placed must not cost the radiologist the report.
    """
    by_instance: dict[str, list[ImageResult]] = defaultdict(list)
    for result in results:
        by_instance[result.frame.sop_instance_uid].append(result)
    if len(by_instance) > 1:
        try:
            return build_segmentations(results, segmenter, ctx)
        except OutputError as exc:
            log.warning(
                "one SEG per instance for series_instance_uid=%s: %s",
                results[0].frame.series_instance_uid,
                exc,
            )
    segs: list[Dataset] = []
    for uid, instance_results in by_instance.items():
        try:
            segs.extend(build_segmentations(instance_results, segmenter, ctx))
        except OutputError as exc:
            log.warning("no SEG for sop_instance_uid=%s: %s", uid, exc)
    return segs


def encode_objects(
    folder: str, objects: Sequence[tuple[str, Dataset]]
) -> list[tuple[ResultObject, bytes]]:
    """Each object as Part 10 bytes, described with its path under ``folder``."""
    encoded = []
    for kind, ds in objects:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        rel = f"{folder}/{kind}/{ds.SOPInstanceUID}.dcm"
        encoded.append(
            (
                ResultObject(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), rel),
                buffer.getvalue(),
            )
        )
    return encoded


def store_objects(
    storage: WorkerStorage, encoded: Sequence[tuple[ResultObject, bytes]]
) -> list[ResultObject]:
    """Write each encoded object where the node reads it (atomically, durably) and describe it.

    Through ``storage``: the node's disk, or an upload to the node's internal API.
    """
    stored = []
    for obj, data in encoded:
        storage.write_result(obj.path, data)
        stored.append(obj)
    return stored
