"""Synthetic DICOM instances for tests: deterministic, small, with known patient values.

The patient values are distinctive strings so a test can grep logs for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TEST_ROOT = "1.2.826.0.1.3680043.10.1234."


@dataclass(frozen=True)
class Patient:
    name: str = "Zebulon^Quixotic"
    patient_id: str = "PID-987654321"
    birth_date: str = "19530817"


def _instance(
    sop_class_uid: str,
    *,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    patient: Patient,
    accession: str,
    study_time: str,
    study_description: str,
) -> Dataset:
    """File meta, SOP common, patient and general study modules shared by the builders."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20261125"
    ds.StudyTime = study_time
    ds.StudyDescription = study_description
    return ds


def ct_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    patient: Patient = Patient(),
    size: int = 64,
    accession: str = "ACC0001",
    sop_instance_uid: str | None = None,
) -> Dataset:
    uid = sop_instance_uid or generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, str(number)])
    ds = _instance(
        CTImageStorage,
        sop_instance_uid=uid,
        study_uid=study_uid,
        series_uid=series_uid,
        patient=patient,
        accession=accession,
        study_time="101500",
        study_description="CT CHEST",
    )
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(number)
    ds.PixelData = rng.integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_series(
    directory: Path,
    count: int,
    *,
    study_uid: str | None = None,
    patient: Patient = Patient(),
    size: int = 64,
    start: int = 1,
) -> tuple[str, list[Path]]:
    """Write ``count`` CT instances of one study/series; return (StudyInstanceUID, paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(prefix=TEST_ROOT)
    series_uid = generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, "series"])
    paths = []
    for n in range(start, start + count):
        ds = ct_instance(study_uid, series_uid, n, patient=patient, size=size)
        path = directory / f"ct_{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def cxr_from_jpeg(
    jpeg: Path,
    out: Path,
    *,
    study_uid: str | None = None,
    accession: str = "CXR0001",
    patient: Patient = Patient(),
    pixel_spacing: float | None = 0.7,
    study_description: str = "XR CHEST PA",
) -> tuple[str, np.ndarray]:
    """A CR chest instance carrying a pediatric CXR JPEG's gray values unchanged.

    Returns (StudyInstanceUID, the 2-D uint8 array stored), so a test can run the
    model on exactly the same pixels directly.
    """
    from PIL import Image
    from pydicom.uid import ComputedRadiographyImageStorage

    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    study_uid = study_uid or generate_uid(prefix=TEST_ROOT)
    series_uid = generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, "cxr-series"])
    uid = generate_uid(prefix=TEST_ROOT, entropy_srcs=[study_uid, jpeg.name])
    ds = _instance(
        ComputedRadiographyImageStorage,
        sop_instance_uid=uid,
        study_uid=study_uid,
        series_uid=series_uid,
        patient=patient,
        accession=accession,
        study_time="093000",
        study_description=study_description,
    )
    ds.SeriesDescription = "PA"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if pixel_spacing is not None:
        ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return study_uid, pixels
