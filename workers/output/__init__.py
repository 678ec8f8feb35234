"""DICOM objects the node sends back to PACS: SEG, TID 1500 SR and a heatmap SC.

Everything is built by highdicom (STYLE.md rule 5) under deterministic UIDs
(`identity`), with patient and study copied from the source so the results file under
the same study.
"""

from __future__ import annotations

from workers.output.errors import OutputError, UnsupportedGeometry
from workers.output.heatmap import build_heatmap_image, render_heatmap
from workers.output.identity import SERIES, derive_uid
from workers.output.report import build_report
from workers.output.results import AlgorithmInfo, ImageResult, OutputContext
from workers.output.segmentation import build_segmentation, build_segmentations

__all__ = [
    "SERIES",
    "AlgorithmInfo",
    "ImageResult",
    "OutputContext",
    "OutputError",
    "UnsupportedGeometry",
    "build_heatmap_image",
    "build_report",
    "build_segmentation",
    "build_segmentations",
    "derive_uid",
    "render_heatmap",
]
