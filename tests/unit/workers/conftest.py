"""Fixtures for the worker tests: the DICOM corpus and small synthetic instances."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: Patient attributes of every synthetic instance; no log line may contain them.
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-4711", "PatientBirthDate": "19700101"}
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


def build(
    pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2", **attributes: Any
) -> Dataset:
    """A CR instance with `pixels` in `photometric` and any attributes overridden."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    if pixels is not None:
        bits = 8 if pixels.dtype.itemsize == 1 else 16
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Dataset], Path]:
    """Save a dataset as a Part 10 file under tmp_path and return its path."""

    def _write(ds: Dataset) -> Path:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return _write
