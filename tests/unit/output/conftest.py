"""Fixtures for the output tests: real sources, synthetic model results, read-back."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from workers.output import AlgorithmInfo, ImageResult, OutputContext

CTX = OutputContext(uid_root="1.2.826.0.1.3680043.8.498.")
CLASSIFIER = AlgorithmInfo("pneumonia-densenet", "1.2.0")
SEGMENTER = AlgorithmInfo("lung-unet", "0.3.1")
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101"}

#: (case id, path under modalities/ or None for the synthetic CR, analysed frame, area known)
CASES = [
    ("cr-monochrome1", "cr/RG1_UNCR.dcm", 1),
    ("dx-j2k", "dx/966_fixed.dcm", 1),
    ("mr-multiframe-no-fg", "multi-frame/emri_small.dcm", 3),
    ("ct-multiframe", "multi-frame/eCT_Supplemental.dcm", 2),
    ("cr-no-spacing", None, 1),
]


def synthetic_cr() -> Dataset:
    """A CR with no Pixel Spacing or Imager Pixel Spacing, made with pydicom."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["synthetic-cr"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["synthetic-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["synthetic-series"])
    ds.Modality = "CR"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "101500", "A1", "S1"
    ds.ReferringPhysicianName = ""
    ds.PatientSex = "F"
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 7
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    # Two dark lungs in a brighter body, with noise: an image (workers.pixels refuses
    # noise alone as a failed exposure).
    noise = np.random.default_rng(0).integers(0, 400, (300, 256))
    pixels = (np.where(two_ellipses(300, 256), 1200, 3200) + noise).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    return ds


def two_ellipses(rows: int, cols: int) -> np.ndarray:
    y, x = np.ogrid[:rows, :cols]
    left = ((x - cols * 0.3) / (cols * 0.15)) ** 2 + ((y - rows * 0.5) / (rows * 0.3)) ** 2 < 1
    right = ((x - cols * 0.7) / (cols * 0.15)) ** 2 + ((y - rows * 0.5) / (rows * 0.3)) ** 2 < 1
    return np.asarray(left | right)


@pytest.fixture(scope="session")
def sources(shared_data: Path) -> dict[str, Dataset]:
    out = {}
    for case, path, _ in CASES:
        out[case] = (
            synthetic_cr()
            if path is None
            else pydicom.dcmread(shared_data / "dicom" / "modalities" / path)
        )
    return out


def make_result(source: Dataset, frame: int, probability: float = 0.83) -> ImageResult:
    rows, cols = int(source.Rows), int(source.Columns)
    mask = two_ellipses(rows, cols)
    spacing = source.get("PixelSpacing")
    area = None
    if spacing is not None and all(float(v) > 0 for v in spacing):
        area = float(mask.sum()) * float(spacing[0]) * float(spacing[1])
    heat = np.outer(np.linspace(0, 1, rows), np.linspace(1, 0, cols)).astype(np.float32)
    return ImageResult(
        source=source,
        frame_number=frame,
        pneumonia_probability=probability,
        pneumonia_present=probability >= 0.5,
        heatmap=heat,
        lung_mask=mask,
        lung_area_mm2=area,
        display=np.full((rows, cols), 0.4, dtype=np.float32),
    )


@pytest.fixture
def results(sources: dict[str, Dataset]) -> Callable[[str], ImageResult]:
    frames = {case: frame for case, _, frame in CASES}
    return lambda case: make_result(sources[case], frames[case])


@pytest.fixture
def read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Dataset, str], Dataset]:
    """Write `ds`, read it with pydicom raising on invalid values, and run dciodvfy."""

    def _read_back(ds: Dataset, name: str) -> Dataset:
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
        back = pydicom.dcmread(path)
        for element in back.iterall():  # values convert (and validate) on access
            _ = element.value
        monkeypatch.setattr(config.settings, "reading_validation_mode", config.WARN)
        run = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", check=False
        )
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy {name}:\n{report}"
        return back

    return _read_back
