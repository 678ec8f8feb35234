"""What the worker hands to the output builders: per-image results, models, context."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

from workers.output.identity import SourceFrame


@dataclass(frozen=True)
class ImageResult:
    """Model outputs for one analysed frame of a stored source instance."""

    source: pydicom.Dataset  # the stored source instance, as read by pydicom
    frame_number: int  # 1-based frame of the source analysed
    pneumonia_probability: float  # [0, 1]
    pneumonia_present: bool  # the model's decision at its threshold
    heatmap: np.ndarray | None  # float [0, 1], (rows, cols) of the source frame
    lung_mask: np.ndarray | None  # bool, (rows, cols)
    lung_area_mm2: float | None
    display: np.ndarray | None  # float [0, 1] display-ready grayscale (MONOCHROME2 sense)

    @property
    def frame(self) -> SourceFrame:
        return SourceFrame.of(self.source, self.frame_number)

    @property
    def is_multiframe(self) -> bool:
        """Whether the source holds frames (Number of Frames present, PS3.3 C.7.6.6)."""
        return "NumberOfFrames" in self.source


@dataclass(frozen=True)
class AlgorithmInfo:
    """A model as named in AlgorithmIdentificationSequence (PS3.3 C.8.20.2.1)."""

    name: str
    version: str
    family: str = "Artificial Intelligence"


@dataclass(frozen=True)
class OutputContext:
    """Who writes the objects: UID root and the device's identity."""

    uid_root: str  # e.g. "1.2.826.0.1.3680043.8.498."
    device_name: str = "triage-node"
    manufacturer: str = "triage-node developers"
    software_version: str = "0.1.0"
    institution_name: str | None = None
