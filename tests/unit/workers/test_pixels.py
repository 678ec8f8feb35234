"""DICOM to model input: range, orientation and refusals, on real files and odd synthetic ones."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence

from node.errors import NodeError
from tests.unit.workers.conftest import PATIENT, build
from workers.pixels import MIN_CONTRAST, ImageFrame, UnreadablePixels, contrast, read_frames

Write = Callable[[Dataset], Path]


def _band(image: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Mean of a region given as fractions of height and width."""
    h, w = image.shape
    return float(
        image[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean()
    )


# Regions of a PA chest film, as fractions of (height, width), checked by eye on PNGs of
# RG1 and 966: mid-lung rows; the patient's right lung (image left, aerated in both
# films), the mediastinum/spine in the centre, and the upper abdomen at the bottom.
MID_LUNG = (0.35, 0.50)
IMAGE_LEFT_LUNG = (0.25, 0.35)
IMAGE_RIGHT_LUNG = (0.65, 0.75)
MEDIASTINUM = (0.47, 0.53)
UPPER_LUNGS = ((0.25, 0.40), (0.20, 0.80))
ABDOMEN = ((0.85, 0.95), (0.20, 0.80))


@pytest.fixture(scope="module")
def rg1(dicom_dir: Path) -> ImageFrame:
    (frame,) = read_frames(dicom_dir / "modalities/cr/RG1_UNCR.dcm")
    return frame


@pytest.fixture(scope="module")
def rg1_j2k(dicom_dir: Path) -> ImageFrame:
    (frame,) = read_frames(dicom_dir / "modalities/cr/RG1_J2KI.dcm")
    return frame


@pytest.fixture(scope="module")
def dx(dicom_dir: Path) -> ImageFrame:
    (frame,) = read_frames(dicom_dir / "modalities/dx/966_fixed.dcm")
    return frame


def _assert_model_input(frame: ImageFrame) -> None:
    assert frame.pixels.dtype == np.float32
    assert frame.pixels.shape == (frame.rows, frame.columns)
    assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0
    assert frame.pixels.std() > 0.1, "no real contrast left"


# -- the chest radiographs -------------------------------------------------------------


def test_cr_monochrome1_15_bit(rg1: ImageFrame) -> None:
    _assert_model_input(rg1)
    assert (rg1.rows, rg1.columns) == (1955, 1841)
    assert rg1.frame_number == 1
    assert rg1.photometric_interpretation == "MONOCHROME1"
    assert rg1.voi_source == "window"
    # RG1's PixelSpacing is 0\0: not a spacing, so none is reported.
    assert rg1.pixel_spacing_mm is None and rg1.spacing_source is None


def test_cr_inverted_by_anatomy(rg1: ImageFrame, dicom_dir: Path) -> None:
    """Lungs darker than the mediastinum after conversion, the opposite in the raw data."""
    lungs = [_band(rg1.pixels, MID_LUNG, c) for c in (IMAGE_LEFT_LUNG, IMAGE_RIGHT_LUNG)]
    centre = _band(rg1.pixels, MID_LUNG, MEDIASTINUM)
    assert max(lungs) < centre - 0.15
    # The same check on the stored MONOCHROME1 values fails: skipping the inversion
    # would be caught.
    raw = dcmread(dicom_dir / "modalities/cr/RG1_UNCR.dcm").pixel_array
    raw_lungs = [_band(raw, MID_LUNG, c) for c in (IMAGE_LEFT_LUNG, IMAGE_RIGHT_LUNG)]
    assert min(raw_lungs) > _band(raw, MID_LUNG, MEDIASTINUM)


def test_cr_top_is_top(rg1: ImageFrame) -> None:
    """The dense upper abdomen at the bottom is brighter than the aerated upper lungs."""
    assert _band(rg1.pixels, *ABDOMEN) > _band(rg1.pixels, *UPPER_LUNGS) + 0.15
    flipped = rg1.pixels[::-1]
    assert not _band(flipped, *ABDOMEN) > _band(flipped, *UPPER_LUNGS)


def test_jpeg2000_lossy_agrees_with_uncompressed(rg1: ImageFrame, rg1_j2k: ImageFrame) -> None:
    assert rg1_j2k.pixels.shape == rg1.pixels.shape
    _assert_model_input(rg1_j2k)
    correlation = np.corrcoef(rg1.pixels.ravel(), rg1_j2k.pixels.ravel())[0, 1]
    assert correlation > 0.99
    assert float(np.abs(rg1.pixels - rg1_j2k.pixels).mean()) < 0.01


def test_dx_16_bit_jpeg2000_lossless(dx: ImageFrame) -> None:
    _assert_model_input(dx)
    assert (dx.rows, dx.columns) == (2128, 2000)
    assert dx.photometric_interpretation == "MONOCHROME1"
    # Pixel Spacing equal to Imager Pixel Spacing, no calibration: the detector plane.
    assert dx.pixel_spacing_mm == (0.16, 0.16) and dx.spacing_source == "ImagerPixelSpacing"
    assert dx.spacing_at_detector
    # The patient's left lung (image right) is opacified in this film: only the right
    # lung is aerated, so only it is compared with the mediastinum.
    lung = _band(dx.pixels, MID_LUNG, IMAGE_LEFT_LUNG)
    assert lung < _band(dx.pixels, MID_LUNG, MEDIASTINUM) - 0.15
    assert _band(dx.pixels, *ABDOMEN) > _band(dx.pixels, *UPPER_LUNGS)
    # MONOCHROME1 with Presentation LUT Shape INVERSE is one inversion, not two (the
    # checks above would fail for zero or two; RG1's test shows the raw ordering).
    assert dx.voi_source == "window"


@pytest.mark.parametrize(
    "name",
    [
        "explicit-vr-big-endian__MR_small_expb.dcm",
        "jpeg-ls-lossless__MR_small_jpeg_ls_lossless.dcm",
        "rle-lossless__MR_small_RLE.dcm",
    ],
)
def test_lossless_transfer_syntaxes_agree(dicom_dir: Path, name: str) -> None:
    """The same MR in other lossless encodings gives exactly the same model input."""
    folder = dicom_dir / "transfer-syntaxes"
    (reference,) = read_frames(folder / "implicit-vr-little-endian__MR_small_implicit.dcm")
    (other,) = read_frames(folder / name)
    _assert_model_input(reference)
    assert np.array_equal(other.pixels, reference.pixels)


# -- multi-frame and LUTs --------------------------------------------------------------


def test_multi_frame_gives_one_frame_each(dicom_dir: Path) -> None:
    path = dicom_dir / "modalities/multi-frame/emri_small.dcm"
    frames = read_frames(path)
    assert [f.frame_number for f in frames] == list(range(1, 11))
    raw = dcmread(path).pixel_array
    for frame, stored in zip(frames, raw, strict=True):
        assert frame.pixels.shape == (64, 64)
        assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0
        # MONOCHROME2 with no window: a clipped linear map of its own frame, not another.
        assert np.corrcoef(frame.pixels.ravel(), stored.ravel())[0, 1] > 0.99
    assert len({f.sop_instance_uid for f in frames}) == 1
    with pytest.raises(UnreadablePixels, match="too many frames: 10 > limit of 5"):
        read_frames(path, max_frames=5)


def test_enhanced_functional_groups(dicom_dir: Path) -> None:
    """Spacing and window come from the Shared/Per-frame Functional Groups."""
    frames = read_frames(dicom_dir / "modalities/multi-frame/eCT_Supplemental.dcm")
    assert [f.frame_number for f in frames] == [1, 2]
    for frame in frames:
        assert frame.spacing_source == "PixelMeasuresSequence"
        assert frame.pixel_spacing_mm == (0.388672, 0.388672)
        assert frame.voi_source == "window"
        _assert_model_input(frame)


def _lut_file(ds: Dataset, keyword: str, lut: np.ndarray, write: Write) -> Path:
    item = ds[keyword][0]
    item.LUTData = [int(v) for v in lut]
    item["LUTData"].VR = "US"
    return write(ds)


def test_modality_lut_sequence(dicom_dir: Path, write: Write) -> None:
    path = dicom_dir / "pixel-features/mlut_18.dcm"
    ds = dcmread(path)
    stored = ds.pixel_array
    (frame,) = read_frames(path)
    assert frame.voi_source == "full range"
    # Signed stored values -2048..2047 through an increasing LUT to 0..65535.
    assert frame.pixels[stored == -2048].max() == 0.0
    assert frame.pixels[stored == 2047].min() == 1.0
    # The file's LUT is linear, which a skipped LUT would survive; a decreasing LUT
    # would not: the image must come out reversed.
    (reversed_lut,) = read_frames(
        _lut_file(ds, "ModalityLUTSequence", 65535 - np.arange(4096) * 16, write)
    )
    assert reversed_lut.pixels[stored == -2048].min() == 1.0
    assert reversed_lut.pixels[stored == 2047].max() == 0.0


def test_voi_lut_sequence(dicom_dir: Path, write: Write) -> None:
    path = dicom_dir / "pixel-features/vlut_04.dcm"
    ds = dcmread(path)
    stored = ds.pixel_array
    (frame,) = read_frames(path)
    assert frame.voi_source == "VOILUTSequence"
    assert frame.pixels[stored == 0].max() == 0.0
    assert frame.pixels[stored == 255].min() == 1.0
    # A threshold LUT: only applying it gives a two-level image.
    step = np.where(np.arange(256) < 128, 0, 65535)
    (thresholded,) = read_frames(_lut_file(ds, "VOILUTSequence", step, write))
    assert set(np.unique(thresholded.pixels)) == {0.0, 1.0}
    assert (thresholded.pixels == 1.0).sum() == (stored >= 128).sum()


# -- windows, synthetic ----------------------------------------------------------------


RAMP = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # 8 x 256, 0..4080


def test_window_clips_and_scales(write: Write) -> None:
    (frame,) = read_frames(write(build(RAMP, BitsStored=12, WindowCenter=1000, WindowWidth=200)))
    assert frame.voi_source == "window"
    assert frame.pixels[RAMP < 900].max() == 0.0
    assert frame.pixels[RAMP > 1100].min() == 1.0
    inside = frame.pixels[0, (RAMP[0] > 900) & (RAMP[0] < 1100)]
    assert np.all(np.diff(inside) > 0) and 0 < inside.min() < inside.max() < 1


def test_first_of_several_windows(write: Write) -> None:
    ds = build(RAMP, BitsStored=12, WindowCenter=[1000, 3000], WindowWidth=[200, 200])
    (frame,) = read_frames(write(ds))
    assert frame.pixels[RAMP > 1100].min() == 1.0


def test_monochrome1_window_is_inverted(write: Write) -> None:
    ds = build(RAMP, BitsStored=12, WindowCenter=1000, WindowWidth=200)
    ds.PhotometricInterpretation = "MONOCHROME1"
    (frame,) = read_frames(write(ds))
    assert frame.pixels[RAMP < 900].min() == 1.0
    assert frame.pixels[RAMP > 1100].max() == 0.0


def test_rescale_then_window(write: Write) -> None:
    """The window applies to rescaled values (CT-like: HU = stored - 1024)."""
    ds = build(RAMP, BitsStored=12, RescaleSlope=1, RescaleIntercept=-1024)
    ds.WindowCenter, ds.WindowWidth = -24, 200  # stored 900..1100
    (frame,) = read_frames(write(ds))
    assert frame.pixels[RAMP < 900].max() == 0.0
    assert frame.pixels[RAMP > 1100].min() == 1.0


def test_unusable_window_falls_back_to_full_range(write: Write) -> None:
    (frame,) = read_frames(write(build(RAMP, BitsStored=12, WindowCenter=1000, WindowWidth=0)))
    assert frame.voi_source == "full range"
    assert frame.pixels.min() == 0.0 and frame.pixels.max() == 1.0


def test_empty_lut_and_rescale_elements_are_absent(write: Write) -> None:
    ds = build(RAMP, BitsStored=12, RescaleSlope=None, RescaleIntercept=None, WindowCenter=None)
    ds.ModalityLUTSequence = Sequence([Dataset()])
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "full range"
    _assert_model_input(frame)


def test_imager_pixel_spacing_when_no_pixel_spacing(write: Write) -> None:
    (frame,) = read_frames(write(build(RAMP, ImagerPixelSpacing=[0.15, 0.14])))
    assert frame.pixel_spacing_mm == (0.15, 0.14)
    assert frame.spacing_source == "ImagerPixelSpacing"
    ds = build(RAMP, ImagerPixelSpacing=[0.15, 0.14], PixelSpacing=[0.125, 0.125])
    (frame,) = read_frames(write(ds))
    assert frame.pixel_spacing_mm == (0.125, 0.125) and frame.spacing_source == "PixelSpacing"


# -- LUT lookups (ours, not pydicom's) and spacing in the patient plane -----------------


def _lut(descriptor: list[int], data: list[int] | bytes, data_vr: str = "US") -> Sequence:
    """A one-item LUT sequence; the descriptor explicitly US (its 16-bit pattern)."""
    item = Dataset()
    item.add_new(0x00283002, "US", [v & 0xFFFF for v in descriptor])  # LUT Descriptor
    item.add_new(0x00283006, data_vr, data)  # LUT Data
    return Sequence([item])


def test_8_bit_voi_lut_with_more_than_256_entries(write: Write) -> None:
    """A 4096-entry LUT with 8 bits per entry (common in CR/DX): positions past 255 must
    not wrap (pydicom 3.0.2 indexes through uint8 and makes a ramp a sawtooth)."""
    ds = build(RAMP, BitsStored=12)
    ds.VOILUTSequence = _lut([4096, 0, 8], [i // 16 for i in range(4096)])
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "VOILUTSequence"
    row = frame.pixels[0]
    assert np.all(np.diff(row) >= 0), "the LUT is increasing; its output must be too"
    assert np.allclose(row, (RAMP[0] // 16) / 255, atol=1e-6)


def test_8_bit_voi_lut_packed_two_entries_per_ow_word(write: Write) -> None:
    table = np.arange(4096) // 16
    ds = build(RAMP, BitsStored=12)
    ds.VOILUTSequence = _lut([4096, 0, 8], table.astype(np.uint8).tobytes(), data_vr="OW")
    (frame,) = read_frames(write(ds))
    assert np.allclose(frame.pixels[0], (RAMP[0] // 16) / 255, atol=1e-6)


def test_voi_lut_first_value_mapped_is_signed_for_signed_input(write: Write) -> None:
    """PS3.3 C.11.2.1.1: for signed input the first value mapped is SS; a descriptor read
    as US (63488) still means -2048."""
    signed = np.tile(np.arange(-2048, 2048, 16, dtype=np.int16), (8, 1))
    ds = build(signed, BitsStored=12)
    assert ds.PixelRepresentation == 1
    ds.VOILUTSequence = _lut([4096, -2048, 16], [i * 16 for i in range(4096)])
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "VOILUTSequence"
    assert np.allclose(frame.pixels[0], (signed[0] + 2048) / 4095, atol=1e-6)


def test_voi_lut_after_rescale_to_negative_values(write: Write) -> None:
    """Unsigned stored values rescaled below 0: the VOI LUT's input is signed."""
    ds = build(RAMP, BitsStored=12, RescaleSlope=1, RescaleIntercept=-1024)
    ds.VOILUTSequence = _lut([4096, -1024, 16], [i * 16 for i in range(4096)])
    (frame,) = read_frames(write(ds))
    assert np.allclose(frame.pixels[0], RAMP[0] / 4095, atol=1e-6)


def test_voi_lut_of_65536_entries_and_unsigned_first_value(write: Write) -> None:
    """0 entries means 65536; 40000 is 40000 for unsigned input (not -25536)."""
    values = np.array([[0, 39999, 40000, 50000, 65535]], dtype=np.uint16)
    ds = build(values)
    inverse = (65535 - np.arange(65536)).astype("<u2").tobytes()
    ds.VOILUTSequence = _lut([0, 0, 16], inverse, data_vr="OW")
    (frame,) = read_frames(write(ds))
    assert np.allclose(frame.pixels, 1 - values / 65535, atol=1e-6)
    ds = build(values)
    ds.VOILUTSequence = _lut([2, 40000, 16], [0, 100])
    (frame,) = read_frames(write(ds))
    assert frame.pixels.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]


def test_modality_lut_of_12_bits_per_entry(write: Write) -> None:
    """PS3.3 C.11.1.1.1 allows 8 to 16 bits per entry; pydicom builds dtype 'uint12'."""
    ds = build(RAMP, BitsStored=12)
    ds.ModalityLUTSequence = _lut([4096, 0, 12], [4095 - i for i in range(4096)])
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "full range"
    assert np.allclose(frame.pixels[0], 1 - RAMP[0] / 4080, atol=1e-6)


@pytest.mark.parametrize(
    "descriptor, data",
    [([4096, 0, 7], [i // 32 for i in range(4096)]), ([4096, 0, 16], list(range(10)))],
    ids=["7 bits per entry", "fewer entries than described"],
)
def test_unusable_voi_lut_gives_way_to_the_window(
    write: Write, descriptor: list[int], data: list[int]
) -> None:
    ds = build(RAMP, BitsStored=12, WindowCenter=1000, WindowWidth=200)
    ds.VOILUTSequence = _lut(descriptor, data)
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "window"
    assert frame.pixels[RAMP < 900].max() == 0.0 and frame.pixels[RAMP > 1100].min() == 1.0


@pytest.mark.parametrize(
    "attributes, spacing, source",
    [
        ({"EstimatedRadiographicMagnificationFactor": 1.25}, (0.16, 0.12), "ERMF"),
        (
            {"PixelSpacing": [0.2, 0.15], "EstimatedRadiographicMagnificationFactor": 1.25},
            (0.16, 0.12),
            "ERMF",
        ),
        ({"PixelSpacing": [0.2, 0.15]}, (0.2, 0.15), "ImagerPixelSpacing"),
        ({"PixelSpacing": [0.18, 0.135]}, (0.18, 0.135), "PixelSpacing"),
        (
            {"PixelSpacing": [0.2, 0.15], "PixelSpacingCalibrationType": "GEOMETRY"},
            (0.2, 0.15),
            "PixelSpacing",
        ),
        ({"EstimatedRadiographicMagnificationFactor": 0}, (0.2, 0.15), "ImagerPixelSpacing"),
    ],
    ids=[
        "ermf",
        "equal-pixel-spacing-ermf",
        "equal-pixel-spacing",
        "calibrated",
        "calibration-type",
        "ermf-zero",
    ],
)
def test_spacing_in_the_patient_plane(
    write: Write, attributes: dict[str, object], spacing: tuple[float, float], source: str
) -> None:
    """Imager Pixel Spacing (or a Pixel Spacing equal to it) is at the detector; divided by
    the Estimated Radiographic Magnification Factor it is in the patient (PS3.3 10.7.1.1)."""
    source = "EstimatedRadiographicMagnificationFactor" if source == "ERMF" else source
    (frame,) = read_frames(write(build(RAMP, ImagerPixelSpacing=[0.2, 0.15], **attributes)))
    assert frame.pixel_spacing_mm == pytest.approx(spacing)
    assert frame.spacing_source == source
    assert frame.spacing_at_detector == (source == "ImagerPixelSpacing")


# -- odd pixel data: handled or refused, never another exception ------------------------


def test_one_bit(write: Write) -> None:
    bits = np.zeros((16, 24), np.uint8)
    bits[4:12, 6:18] = 1
    ds = build(
        None, Rows=16, Columns=24, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2"
    )
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.PixelData = pack_bits(bits)
    (frame,) = read_frames(write(ds))
    assert frame.pixels.shape == (16, 24)
    assert np.array_equal(frame.pixels, bits.astype(np.float32))


def test_float_pixel_data(write: Write) -> None:
    values = np.linspace(-1.5, 3.0, 32 * 40, dtype=np.float32).reshape(32, 40)
    values[0, 0], values[0, 1] = np.nan, np.inf
    ds = build(
        None, Rows=32, Columns=40, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2"
    )
    ds.BitsAllocated = 32
    ds.FloatPixelData = values.astype("<f4").tobytes()
    (frame,) = read_frames(write(ds))
    assert frame.voi_source == "robust range"
    assert np.isfinite(frame.pixels).all()
    _assert_model_input(frame)
    # NaN and -inf go to the lowest finite value, +inf to the highest.
    assert frame.pixels[0, 0] == 0.0 and frame.pixels[0, 1] == 1.0
    assert frame.pixels[0, 2] == 0.0 and frame.pixels[31, 39] == 1.0


def test_zero_size(write: Write) -> None:
    ds = build(None, Rows=0, Columns=0, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = b""
    with pytest.raises(UnreadablePixels, match=r"image has no pixels: 0x0"):
        read_frames(write(ds))


def test_too_large_is_refused_before_decoding(write: Write) -> None:
    ds = build(np.zeros((4000, 4000), np.uint8))
    with pytest.raises(UnreadablePixels, match=r"image too large: 4000x4000 > limit"):
        read_frames(write(ds), max_pixels=10_000_000)


# -- no contrast: a blank or failed exposure is not an image to analyse -------------------
# The models normalise a flat frame to zeros, which the shipped classifier calls pneumonia
# at 0.99 (urgent): such a frame must be refused, never turned into model input.


def test_constant_image_is_refused(write: Write) -> None:
    with pytest.raises(UnreadablePixels, match=r"no usable contrast \(blank or failed exposure"):
        read_frames(write(build(np.full((8, 8), 700, np.uint16))))


def test_blank_exposure_with_a_burnt_in_marker_is_refused(write: Write) -> None:
    values = np.full((200, 200), 1000, np.uint16)
    values[5:10, 5:12] = 4095  # an "L" marker: min-max scaling still sees contrast
    values[100, 100] = 0  # and a dead pixel
    with pytest.raises(UnreadablePixels, match="no usable contrast"):
        read_frames(write(build(values, BitsStored=12, HighBit=11)))


def test_window_that_saturates_every_pixel_is_refused(write: Write) -> None:
    ds = build(RAMP, WindowCenter=60000, WindowWidth=100)  # RAMP lies far below it
    with pytest.raises(UnreadablePixels, match=r"no usable contrast.*\(window\)"):
        read_frames(write(ds))


def test_flat_float_pixel_data_is_refused(write: Write) -> None:
    ds = build(None, Rows=8, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.full((8, 8), 3.5, "<f4").tobytes()
    with pytest.raises(UnreadablePixels, match=r"no usable contrast.*\(robust range\)"):
        read_frames(write(ds))


def test_low_contrast_image_is_read(write: Write) -> None:
    # 12 stored grey levels of 4096, a ramp across the frame: faint, but an image (it has
    # structure larger than a pixel); full range stretches it.
    values = np.tile(1000 + np.arange(64, dtype=np.uint16) * 12 // 64, (64, 1))
    (frame,) = read_frames(write(build(values, BitsStored=12, HighBit=11)))
    assert contrast(frame.pixels) > 0.9


def test_no_real_chest_radiograph_is_refused(shared_data: Path) -> None:
    """Every chest X-ray in ../shared/data has far more contrast than MIN_CONTRAST."""
    paths = sorted((shared_data / "cxr-lungs" / "images").glob("*.png"))
    paths += sorted((shared_data / "cxr-pneumonia" / "val").rglob("*.jpeg"))
    assert len(paths) > 300
    lowest = min(
        contrast(np.asarray(Image.open(p).convert("L"), np.float32) / 255.0) for p in paths
    )
    assert lowest > 20 * MIN_CONTRAST


def test_no_pixel_data(dicom_dir: Path) -> None:
    with pytest.raises(UnreadablePixels, match="no pixel data"):
        read_frames(dicom_dir / "modalities/sr/test-SR.dcm")


@pytest.mark.parametrize(
    ("name", "photometric"),
    [
        ("pixel-features/SC_rgb.dcm", "RGB"),
        ("pixel-features/SC_ybr_full_uncompressed.dcm", "YBR_FULL"),
        ("modalities/us/OBXXXX1A.dcm", "PALETTE COLOR"),
        ("modalities/multi-frame/color3d_jpeg_baseline.dcm", "YBR_FULL_422"),
    ],
)
def test_colour_is_refused(dicom_dir: Path, name: str, photometric: str) -> None:
    with pytest.raises(
        UnreadablePixels, match=f"colour images \\({photometric}\\) are not supported"
    ):
        read_frames(dicom_dir / name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken/JPEG2000-embedded-sequence-delimiter.dcm", r"cannot be decoded \(JPEG 2000"),
        ("broken/RG2_JPLY.dcm", r"cannot be decoded \(JPEG Extended"),
        ("broken/MR_truncated.dcm", "cannot be decoded"),
        ("broken/badVR.dcm", "Number of Frames is not a number"),
        ("broken/no_meta.dcm", "no pixel data"),
    ],
)
def test_broken_files_are_unreadable(dicom_dir: Path, name: str, reason: str) -> None:
    with pytest.raises(UnreadablePixels, match=reason) as raised:
        read_frames(dicom_dir / name)
    assert isinstance(raised.value, NodeError)


def test_whole_corpus_reads_or_refuses(dicom_corpus: list[Path]) -> None:
    """Every corpus file gives valid frames or UnreadablePixels; nothing else escapes.

    A lowered size limit keeps this fast: the large radiographs are decoded above.
    """
    outcomes = {"read": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in dicom_corpus:
            try:
                frames = read_frames(path, max_pixels=1_100_000)
            except UnreadablePixels as exc:
                assert exc.reason
                outcomes["refused"] += 1
                continue
            for frame in frames:
                assert frame.pixels.ndim == 2 and frame.pixels.dtype == np.float32
                assert frame.pixels.min() >= 0.0 and frame.pixels.max() <= 1.0
            outcomes["read"] += 1
    assert outcomes["read"] >= 25 and outcomes["refused"] >= 15


def test_no_patient_attributes_in_logs(write: Write, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ok = build(RAMP, BitsStored=12, WindowCenter=1000, WindowWidth=0)  # logs a fallback
    colour = build(np.zeros((4, 4, 3), np.uint8), photometric="RGB")
    read_frames(write(ok))
    with pytest.raises(UnreadablePixels):
        read_frames(write(colour))
    assert ok.SOPInstanceUID in caplog.text and colour.SOPInstanceUID in caplog.text
    for value in PATIENT.values():
        assert value not in caplog.text


def test_without_voi_the_map_is_affine(write: Write) -> None:
    """No window: stored values map linearly to [0, 1], nothing clipped (the model sees them as stored)."""
    values = np.array([[0, 10, 20], [30, 250, 255]], dtype=np.uint8)
    ds = build(values)
    (frame,) = read_frames(write(ds))
    expected = (values.astype(np.float32) - 0) / 255
    assert np.allclose(frame.pixels, expected, atol=1e-6)
