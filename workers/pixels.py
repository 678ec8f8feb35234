"""Stored DICOM instance to model input: decode, then the grayscale display pipeline.

The models (`models.inference`) take 2-D arrays in display orientation and MONOCHROME2
sense. This module is the DICOM half of that contract (PS3.4 N.2.1, the grayscale
transformations): Modality LUT (PS3.3 C.11.1) -> VOI LUT or window (C.11.2) -> inversion
of MONOCHROME1 (C.7.6.3.1.2), one array per frame, values in [0, 1].

Decoding is pydicom's, with whatever pixel data plugins are installed (pylibjpeg with
openjpeg, libjpeg and rle; pyjpegls; GDCM if present), so every transfer syntax pydicom
reads is covered, deflate and big endian included. Rescale and window are pydicom's
`pydicom.pixels` functions. The Modality and VOI LUT *lookups* are ours (`_lut_table`,
`_lookup`): pydicom 3.0 indexes an 8-bit VOI LUT through a uint8 array, so every
input above 255 wraps (a 4096-entry CR/DX LUT turns a ramp into a sawtooth), and it
refuses a Modality LUT of 9 to 15 bits per entry, which PS3.3 C.11.1.1.1 allows. This
module chooses which step to apply and scales its output range to [0, 1].

Decisions:

* **Colour is refused.** The CR and DX IODs allow only MONOCHROME1/2 (PS3.3 C.8.1.2,
  C.8.11.3.1.1); a colour chest image is a screenshot or secondary capture that the
  models were never checked on, so RGB, YBR_* and PALETTE COLOR raise `UnreadablePixels`.
* **LUTs** (PS3.3 C.11.1.1.1, C.11.2.1.1): 0 entries means 65536; the first value
  mapped is signed exactly when the LUT's input can be negative (Pixel Representation
  for a Modality LUT; for a VOI LUT the range that rescaling can give), whatever VR
  the descriptor was read with; inputs below it take the first entry and inputs
  beyond the table the last; 8 to 16 bits per entry, 8-bit OW data packed two per
  word or one per word.
* **VOI:** a VOI LUT Sequence wins over a window (pydicom's ``prefer_lut``); the first
  of several windows or LUTs is used (the modality's default view, PS3.3 C.11.2.1.2);
  a LUT that cannot be applied gives way to the window. Without either, or with an
  unusable one, the frame's own minimum and maximum map linearly to [0, 1]: an affine
  map clips nothing, so the model (whose normalisation is affine-invariant) sees
  exactly what it would see on the stored values.
* **Spacing** is in the patient plane where the header says how: Pixel Spacing when
  calibrated (it differs from Imager Pixel Spacing, or a calibration type is given),
  else Imager Pixel Spacing divided by the Estimated Radiographic Magnification
  Factor (PS3.3 10.7.1.1, C.8.11.7). With neither, Imager Pixel Spacing (or Pixel
  Spacing equal to it) is detector-plane spacing and ``spacing_source`` says so.
* **Inversion** follows Photometric Interpretation only. DX requires Presentation LUT
  Shape INVERSE exactly when the image is MONOCHROME1 (PS3.3 C.8.11.6.1.2): both say
  the same thing, so inverting for each would invert twice.
* **Float pixel data** (Float/Double Float Pixel Data) has no Modality or VOI LUT
  that pydicom applies; it gets the robust range. NaN and infinities are clamped.
* **1-bit** pixel data is unpacked by pydicom and treated like any other grayscale.
* **Size limits** are checked on the header before anything is decoded.
* **No contrast, no image.** A blank or failed exposure (or a window that saturates
  everything) is refused (`MIN_CONTRAST`): the models normalise a flat image to zeros,
  which the classifier reads as near-certain pneumonia.
* **No structure, no image.** A failed exposure is often not flat but detector noise
  around one level; without a window the full-range map stretches that noise over the
  whole display range, so it passes the contrast test, and the classifier scores it.
  What noise lacks is structure larger than a pixel: averaged over blocks (16 x 16 of
  them) it vanishes, while a radiograph's anatomy, borders and collimation survive. A
  frame whose block means span less than `MIN_STRUCTURE` of its robust range is refused
  (`structure`). Frames under 48 pixels a side are not judged: their blocks are too
  small to average noise away.
* **Multi-frame:** a frame that cannot be analysed (no contrast, no structure, a failed
  grayscale step) is skipped and recorded (`DecodedInstance.skipped`: frame number and
  reason, logged with the SOP Instance UID); the instance fails only when no frame is
  left, with the reasons. A single-frame instance fails with its frame's own reason.

Every failure is an `UnreadablePixels` with a reason a person can act on; logs carry
the SOP Instance UID and nothing about the patient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.pixels.utils import iter_pixels

from node.errors import NodeError

log = logging.getLogger(__name__)

#: Robust intensity range used when the instance has no usable VOI (percent).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

#: Least robust range (0.5th to 99.5th percentile) of a display frame in [0, 1] that
#: counts as an image: one grey level of an 8-bit display. Below it the frame is blank,
#: saturated or only burnt-in text on a flat field; real chest radiographs (all of
#: ../shared/data) have at least 0.35.
MIN_CONTRAST = 1 / 256

#: Least structure (`structure`) of a display frame that counts as an image: the spread
#: (5th to 95th percentile) of its block means as a share of its robust range. Measured
#: on ../shared/data: chest X-rays (all 5,526 JPEGs and 34 PNGs) >= 0.34, every frame of
#: every readable DICOM file (CR, DX, CT, MR, US, SEG, RT Dose) >= 0.26; noise-only
#: frames (Gaussian, Poisson or uniform, 8 to 16 bits, 48 to 3000 pixels a side, with or
#: without a burnt-in marker) <= 0.09. 0.15 sits between them, with a margin on each side.
MIN_STRUCTURE = 0.15

#: Blocks per side for `structure`, fewer on small frames so that a block keeps at least
#: `_MIN_BLOCK` pixels a side; frames whose sample is under `_MIN_STRUCTURE_SIDE` pixels
#: a side are not judged.
_STRUCTURE_GRID = 16
_MIN_BLOCK = 16
_MIN_STRUCTURE_SIDE = 48
#: `structure` works on a strided sample of about this many pixels: the 600 x 600 view of
#: a 3000 x 3000 detector still has blocks of 37 x 37 pixels.
_STRUCTURE_SAMPLE = 1 << 18

#: Percentiles are taken on a strided sample of about this many pixels: same answer to
#: well under one grey level, a fraction of the time on a 4k x 4k detector.
_PERCENTILE_SAMPLE = 1 << 20

_GRAYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: Top-level attributes the grayscale pipeline reads; copied into each frame's view.
_PIPELINE_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor",
    "PixelSpacingCalibrationType",
)

#: `ImageFrame.spacing_source` values.
PATIENT_PLANE_SOURCES = frozenset(
    {"PixelSpacing", "PixelMeasuresSequence", "EstimatedRadiographicMagnificationFactor"}
)
#: Imager Pixel Spacing, or a Pixel Spacing equal to it, with no magnification factor:
#: distances at the detector, larger than in the patient by the magnification.
DETECTOR_PLANE = "ImagerPixelSpacing"

#: Enhanced multi-frame functional groups (PS3.3 C.7.6.16) that override the above.
_FUNCTIONAL_GROUPS = (
    "PixelMeasuresSequence",  # PixelSpacing
    "PixelValueTransformationSequence",  # RescaleSlope, RescaleIntercept
    "FrameVOILUTSequence",  # WindowCenter, WindowWidth, VOILUTFunction
)


class UnreadablePixels(NodeError):
    """The instance's pixel data cannot become model input; ``reason`` says why."""

    def __init__(self, reason: str, sop_instance_uid: str = "") -> None:
        self.reason = reason
        self.sop_instance_uid = sop_instance_uid
        super().__init__(reason)


@dataclass(frozen=True, eq=False)  # eq=False: ndarray equality is elementwise
class ImageFrame:
    """One frame as model input: float32 (rows, columns), display sense, values in [0, 1].

    ``pixel_spacing_mm`` is (row spacing, column spacing) in mm from ``spacing_source``:
    "PixelSpacing" (in the patient: calibrated, or from an IOD without Imager Pixel
    Spacing), "PixelMeasuresSequence" (enhanced multi-frame),
    "EstimatedRadiographicMagnificationFactor" (Imager Pixel Spacing divided by it, in
    the patient plane), "ImagerPixelSpacing" (`DETECTOR_PLANE`: at the detector, not
    corrected for magnification, PS3.3 10.7.1.1) or None when absent or zero.
    ``voi_source`` records which VOI step
    produced the grey levels: "VOILUTSequence", "window", "full range" (integer data
    without a usable VOI) or "robust range" (float data).
    """

    sop_instance_uid: str
    frame_number: int
    pixels: NDArray[np.float32]
    pixel_spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    rows: int
    columns: int
    photometric_interpretation: str
    voi_source: str

    @property
    def spacing_at_detector(self) -> bool:
        """Whether ``pixel_spacing_mm`` is detector-plane (magnified) spacing."""
        return self.spacing_source == DETECTOR_PLANE


@dataclass(frozen=True)
class SkippedFrame:
    """A frame of a multi-frame instance left out, and why (no patient data in it)."""

    frame_number: int
    reason: str


@dataclass(frozen=True, eq=False)
class DecodedInstance:
    """The frames of one instance that can be analysed, and those skipped (1-based numbers)."""

    sop_instance_uid: str
    frames: list[ImageFrame]
    skipped: list[SkippedFrame]


def read_frames(
    path: Path, *, max_pixels: int = 30_000_000, max_frames: int | None = None
) -> list[ImageFrame]:
    """The display-ready frames of the stored instance at `path` (see `read_instance`).

    Frames that cannot be analysed are left out (and logged); `read_instance` says which.
    """
    return read_instance(path, max_pixels=max_pixels, max_frames=max_frames).frames


def read_instance(
    path: Path,
    *,
    max_pixels: int = 30_000_000,
    max_frames: int | None = None,
    for_display: bool = False,
) -> DecodedInstance:
    """Decode the stored instance at `path` into display-ready frames.

    `max_pixels` bounds Rows x Columns of one frame and `max_frames` the number of
    frames (None: no limit); both are checked on the header before decoding. Frames are
    decoded one at a time, so peak memory is the dataset, a few float copies of one
    frame, and the float32 results.

    A frame that decodes but cannot be analysed (blank, noise only, a grayscale step
    that fails) is skipped and listed in ``skipped``; one bad frame of a cine loop or
    an enhanced object does not lose the others.

    Raises `UnreadablePixels`, and nothing else, for any file whose pixels cannot become
    model input: the header or the decoding fails, or no frame is left. A single-frame
    instance keeps its frame's own reason.

    ``for_display`` is for people looking at the image (the web viewer): every frame
    that decodes is returned, blank and noise-only ones too, because a reader must see
    a failed exposure as it is; only the model input is judged.
    """
    uid = ""
    ds: Dataset | None = None
    frames: list[ImageFrame] = []
    skipped: list[SkippedFrame] = []
    try:
        ds = dcmread(path, force=True)
        uid = str(ds.get("SOPInstanceUID", "") or "")
        nr_frames = _check_header(ds, max_pixels=max_pixels, max_frames=max_frames)
        is_float = "PixelData" not in ds
        for index, raw in enumerate(iter_pixels(ds, indices=range(nr_frames))):
            try:
                frames.append(
                    _frame(ds, index, raw, is_float=is_float, uid=uid, judge=not for_display)
                )
            except UnreadablePixels as exc:
                if nr_frames == 1:
                    raise
                skipped.append(SkippedFrame(index + 1, exc.reason))
        if skipped and not frames:
            raise UnreadablePixels(_none_left(skipped, nr_frames))
    except UnreadablePixels as exc:
        exc.sop_instance_uid = exc.sop_instance_uid or uid
        log.warning("unreadable pixels sop_instance_uid=%s reason=%s", uid, exc.reason)
        raise
    except MemoryError as exc:
        raise _refuse("not enough memory to decode the pixel data", uid) from exc
    except Exception as exc:  # any decoder failure fails the study, never the worker
        reason = f"pixel data cannot be decoded{_syntax_of(ds)}: {_one_line(exc)}"
        raise _refuse(reason, uid) from exc
    if not frames:
        raise _refuse("pixel data holds no frames", uid)
    if skipped:
        log.warning(
            "frames not analysed sop_instance_uid=%s skipped=%d of %d first=%d reason=%s",
            uid,
            len(skipped),
            len(skipped) + len(frames),
            skipped[0].frame_number,
            skipped[0].reason,
        )
    log.debug("decoded sop_instance_uid=%s frames=%d", uid, len(frames))
    return DecodedInstance(uid, frames, skipped)


def _frame(
    ds: Dataset, index: int, raw: NDArray[Any], *, is_float: bool, uid: str, judge: bool = True
) -> ImageFrame:
    """Frame `index` (0-based) of `ds`, decoded as `raw`, through the grayscale pipeline."""
    try:
        view, spacing, spacing_source = _frame_view(ds, index)
        pixels, voi_source = _display(raw, view, is_float=is_float, uid=uid, judge=judge)
    except (UnreadablePixels, MemoryError):
        raise
    except Exception as exc:
        reason = f"grayscale transformations failed: {_one_line(exc)}"
        raise UnreadablePixels(reason) from exc
    return ImageFrame(
        sop_instance_uid=uid,
        frame_number=index + 1,
        pixels=pixels,
        pixel_spacing_mm=spacing,
        spacing_source=spacing_source,
        rows=int(pixels.shape[0]),
        columns=int(pixels.shape[1]),
        photometric_interpretation=str(ds.PhotometricInterpretation),
        voi_source=voi_source,
    )


def _none_left(skipped: list[SkippedFrame], nr_frames: int) -> str:
    """The reason an instance whose every frame was skipped fails: counts, then the first few."""
    shown = "; ".join(f"frame {s.frame_number}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"no frame can be analysed ({len(skipped)} of {nr_frames} skipped): {shown}{more}"


def _refuse(reason: str, uid: str) -> UnreadablePixels:
    log.warning("unreadable pixels sop_instance_uid=%s reason=%s", uid, reason)
    return UnreadablePixels(reason, uid)


def _one_line(exc: BaseException) -> str:
    """One line from an error message: pydicom's list one line per plugin tried."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text.replace(":;", ":")
    return (text or type(exc).__name__)[:300]


def _syntax_of(ds: Dataset | None) -> str:
    """A " (JPEG 2000)"-style suffix naming the transfer syntax, or "" if unknown."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f" ({syntax.name})" if syntax else ""


def _check_header(ds: Dataset, *, max_pixels: int, max_frames: int | None) -> int:
    """Refuse what cannot or should not be decoded; return the number of frames."""
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise UnreadablePixels("no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in _GRAYSCALE:
        if not photometric:
            raise UnreadablePixels("Photometric Interpretation is missing")
        raise UnreadablePixels(
            f"colour images ({photometric}) are not supported by the chest models"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise UnreadablePixels(f"grayscale image with {samples} samples per pixel")
    rows = int(ds.get("Rows", 0) or 0)
    columns = int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise UnreadablePixels(f"image has no pixels: {rows}x{columns}")
    if rows * columns > max_pixels:
        raise UnreadablePixels(f"image too large: {rows}x{columns} > limit of {max_pixels} pixels")
    raw_frames = ds.get("NumberOfFrames", 1)
    try:
        nr_frames = int(raw_frames) if raw_frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise UnreadablePixels(f"Number of Frames is not a number: {raw_frames!r}") from None
    nr_frames = max(nr_frames, 1)  # 0 is non-conformant; pydicom reads it as 1 as well
    if max_frames is not None and nr_frames > max_frames:
        raise UnreadablePixels(f"too many frames: {nr_frames} > limit of {max_frames}")
    return nr_frames


def _frame_view(ds: Dataset, index: int) -> tuple[Dataset, tuple[float, float] | None, str | None]:
    """The attributes the pipeline needs for frame `index`, functional groups applied.

    Enhanced multi-frame objects keep rescale, window and spacing in the Shared and
    Per-frame Functional Groups (PS3.3 C.7.6.16); pydicom's LUT functions read them
    from the top level, so they are lifted into a small per-frame dataset. Per-frame
    values override shared ones, which override top-level ones.
    """
    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # endianness of OW LUT Data
    view.set_original_encoding(*ds.original_encoding)
    for keyword in _PIPELINE_KEYWORDS:
        if keyword in ds:
            _lift(view, ds[keyword])
    from_groups = False
    for groups_keyword, item_index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", index),
    ):
        groups = ds.get(groups_keyword)
        if not groups or item_index >= len(groups):
            continue
        for group_keyword in _FUNCTIONAL_GROUPS:
            group = groups[item_index].get(group_keyword)
            if not group:
                continue
            for element in group[0]:
                if element.keyword in _PIPELINE_KEYWORDS and _lift(view, element):
                    from_groups = from_groups or element.keyword == "PixelSpacing"
    spacing, source = _spacing(view)
    if from_groups and source == "PixelSpacing":
        source = "PixelMeasuresSequence"
    return view, spacing, source


def _lift(view: Dataset, element: DataElement) -> bool:
    """Copy `element` into `view` unless it is empty; return whether it was copied.

    Senders fill type 2 and 3 attributes with empty values (an empty Rescale Slope, a
    Modality LUT item without LUT Data); pydicom's LUT functions test for presence, so
    an empty element would be applied and fail. Empty means absent here.
    """
    if element.VR == "SQ":  # the LUT sequences: one item with descriptor and data
        items = element.value
        item = items[0] if items else Dataset()
        if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
            return False
    elif element.value is None or element.value == "":
        return False
    view[element.tag] = element
    return True


def frame_spacing(
    ds: Dataset, frame_number: int = 1
) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm of frame `frame_number` (1-based) and its source.

    The same answer as `read_frames` gives in ``pixel_spacing_mm`` and
    ``spacing_source``, from the header alone.
    """
    _, spacing, source = _frame_view(ds, frame_number - 1)
    return spacing, source


def _spacing(view: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm and its source (PS3.3 10.7.1.1, C.8.11.7).

    Pixel Spacing is in the patient unless it merely repeats Imager Pixel Spacing
    without a calibration type (10.7.1.1: then the image was not corrected). Imager
    Pixel Spacing is at the detector; divided by the Estimated Radiographic
    Magnification Factor it is in the patient plane.
    """
    pixel = _pair(view, "PixelSpacing")
    imager = _pair(view, "ImagerPixelSpacing")
    uncorrected = imager is not None and (
        pixel is None
        or (not view.get("PixelSpacingCalibrationType") and np.allclose(pixel, imager))
    )
    if imager is not None and uncorrected:
        factor = _positive(view.get("EstimatedRadiographicMagnificationFactor"))
        if factor is None:
            return imager, DETECTOR_PLANE
        return (imager[0] / factor, imager[1] / factor), "EstimatedRadiographicMagnificationFactor"
    if pixel is not None:
        return pixel, "PixelSpacing"
    return None, None


def _pair(view: Dataset, keyword: str) -> tuple[float, float] | None:
    """A two-valued spacing attribute with both values finite and positive, else None."""
    value = view.get(keyword)
    values = list(value) if isinstance(value, MultiValue | list | tuple) else []
    numbers = [_positive(v) for v in values]
    if len(numbers) != 2 or numbers[0] is None or numbers[1] is None:
        return None
    return numbers[0], numbers[1]


def _positive(value: object) -> float | None:
    """`value` as a finite positive float, else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _display(
    raw: NDArray[Any], view: Dataset, *, is_float: bool, uid: str, judge: bool = True
) -> tuple[NDArray[np.float32], str]:
    """Modality LUT -> VOI -> [0, 1] -> MONOCHROME1 inversion, for one 2-D frame.

    ``judge``: refuse a frame without contrast or structure (model input only).
    """
    if raw.ndim != 2:
        raise UnreadablePixels(f"expected a 2-D frame, decoded shape {raw.shape}")
    if is_float:
        values: NDArray[Any] = raw.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise UnreadablePixels("float pixel data holds no finite values")
        if not finite.all():
            low, high = values[finite].min(), values[finite].max()
            values = np.nan_to_num(values, nan=low, neginf=low, posinf=high)
        unit, source = robust_unit(values), "robust range"
    else:
        if _has_lut(view, "ModalityLUTSequence"):
            pixel_signed = int(view.get("PixelRepresentation", 0) or 0) == 1
            values = _lookup(raw, *_lut_table(view.ModalityLUTSequence[0], view, pixel_signed))
        else:
            values = apply_modality_lut(raw, view)  # rescale slope and intercept
        unit, source = _voi_unit(values, view, uid)
    if judge:
        _judge(unit, source)
    if str(view.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32), source


def _judge(unit: NDArray[Any], source: str) -> None:
    """Refuse a display frame a model cannot analyse: flat, or noise without structure."""
    span = contrast(unit)
    if span < MIN_CONTRAST:
        raise UnreadablePixels(
            f"no usable contrast (blank or failed exposure?): 99% of the pixels lie within "
            f"{span:.2%} of the display range ({source})"
        )
    shape = structure(unit, span)
    if shape is not None and shape < MIN_STRUCTURE:
        raise UnreadablePixels(
            f"no image structure (blank or failed exposure?): only noise, averaged over "
            f"blocks {shape:.0%} of its contrast is left, an image keeps at least "
            f"{MIN_STRUCTURE:.0%} ({source})"
        )


def _voi_unit(values: NDArray[Any], view: Dataset, uid: str) -> tuple[NDArray[Any], str]:
    """Apply the first VOI LUT or window and scale its output range to [0, 1].

    A LUT's output range is its entries' range; a window's is pydicom's own answer
    for -inf and +inf (its y_min and y_max, PS3.3 C.11.2.1.2). A LUT that cannot be
    applied gives way to the window, and that to the full range.
    """
    if _has_lut(view, "VOILUTSequence"):
        try:
            first, table = _lut_table(view.VOILUTSequence[0], view, _voi_input_signed(view))
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            _unusable_voi(uid, "VOI LUT", exc)
        else:
            unit = _scale(_lookup(values, first, table), table.min(), table.max())
            return unit, "VOILUTSequence"
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        try:
            low, high = apply_windowing(np.array([-np.inf, np.inf]), view)
            if not (np.isfinite(low) and np.isfinite(high) and low != high):
                raise ValueError(f"window gives no output range: {low} to {high}")
            return _scale(apply_windowing(values, view), low, high), "window"
        except (ValueError, NotImplementedError, TypeError, IndexError, AttributeError) as exc:
            _unusable_voi(uid, "window", exc)
    return _scale(values, float(values.min()), float(values.max())), "full range"


def _unusable_voi(uid: str, what: str, exc: BaseException) -> None:
    log.warning(
        "unusable %s, trying the next VOI step sop_instance_uid=%s reason=%s",
        what,
        uid,
        _one_line(exc),
    )


def _has_lut(view: Dataset, keyword: str) -> bool:
    sequence = view.get(keyword)
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _voi_input_signed(view: Dataset) -> bool:
    """Whether the VOI LUT's input, the Modality LUT's output, can be negative.

    PS3.3 C.11.2.1.1: the first value mapped is SS when that output may be signed. A
    Modality LUT's entries are unsigned; rescaling maps the stored range (Bits Stored,
    Pixel Representation) through slope and intercept, as pydicom applies them.
    """
    if _has_lut(view, "ModalityLUTSequence"):
        return False
    bits = int(view.get("BitsStored", 16) or 16)
    signed = int(view.get("PixelRepresentation", 0) or 0) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if "RescaleSlope" in view and "RescaleIntercept" in view:
        slope, intercept = float(view.RescaleSlope), float(view.RescaleIntercept)
        return min(low * slope + intercept, high * slope + intercept) < 0
    return low < 0


def _lut_table(item: Dataset, view: Dataset, signed: bool) -> tuple[int, NDArray[np.int64]]:
    """The first input value mapped and the entries of a Modality or VOI LUT item.

    LUT Descriptor (PS3.3 C.11.1.1.1, C.11.2.1.1): number of entries (0 is 65536),
    first value mapped (taken as a 16-bit pattern, signed when `signed`, whichever of
    US and SS the descriptor was read as), bits per entry (8 to 16). LUT Data is US
    values or OW words in the dataset's byte order; 8-bit entries in OW may also be
    packed two per word, low byte first. ValueError for anything else.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"LUT Descriptor has {len(descriptor)} values, not 3")
    entries = (descriptor[0] & 0xFFFF) or 0x10000
    first = descriptor[1] & 0xFFFF
    if signed and first >= 0x8000:
        first -= 0x10000
    bits = descriptor[2]
    if not 8 <= bits <= 16:
        raise ValueError(f"{bits} bits per LUT entry, not 8 to 16")
    value = item.LUTData
    if isinstance(value, bytes):  # OW (or not yet converted from an implicit VR file)
        words = np.frombuffer(value[: len(value) // 2 * 2], dtype=f"{_byte_order(view)}u2")
        if bits == 8 and len(words) < entries <= 2 * len(words):
            words = np.stack([words & 0xFF, words >> 8], axis=1).ravel()
        table = words.astype(np.int64)
    else:
        table = np.asarray(value if isinstance(value, MultiValue | list) else [value], np.int64)
    if len(table) < entries:
        raise ValueError(f"LUT Data holds {len(table)} entries, LUT Descriptor says {entries}")
    return first, table[:entries]


def _byte_order(view: Dataset) -> str:
    """'<' or '>': the byte order of OW values as read (the dataset's encoding)."""
    little = view.original_encoding[1]
    if little is None:  # built in memory: the transfer syntax it is meant for
        syntax = getattr(getattr(view, "file_meta", None), "TransferSyntaxUID", None)
        little = syntax is None or syntax.is_little_endian
    return "<" if little else ">"


def _lookup(values: NDArray[Any], first: int, table: NDArray[np.int64]) -> NDArray[np.int64]:
    """`table` applied to `values` with an int64 index (value - first) clipped to it.

    Inputs below the first value mapped take the first entry, inputs past the end the
    last one (PS3.3 C.11.2.1.1). Non-integer (rescaled) inputs are rounded.
    """
    if values.dtype.kind in "iub":
        index = values.astype(np.int64)
    else:
        index = np.rint(values).astype(np.int64)
    index -= first
    np.clip(index, 0, len(table) - 1, out=index)
    return table[index]


def _scale(values: NDArray[Any], low: float, high: float) -> NDArray[Any]:
    """Map `low` to 0 and `high` to 1 (either order), clipped.

    Computed in float64: float pixel data may hold values beyond float32's range,
    and then the difference and the quotient came out inf - inf = NaN. A span that
    overflows even float64 is halved first (exact for binary floats).
    """
    if low == high:
        return np.zeros(values.shape, np.float32)
    wide = values.astype(np.float64, copy=False)
    span = high - low
    if not np.isfinite(span):
        wide, low, high = wide * 0.5, low * 0.5, high * 0.5
        span = high - low
    out = ((wide - low) / span).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_unit(values: NDArray[Any]) -> NDArray[Any]:
    """Percentile range to [0, 1]; min-max if that is flat; zeros for a constant image."""
    if values.dtype.kind == "f" and not np.isfinite(float(values.max()) - float(values.min())):
        values = values * 0.5  # the percentiles interpolate across the range: keep it finite
    low, high = _robust_range(values)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return _scale(values, low, high)


def contrast(pixels: NDArray[Any]) -> float:
    """Robust range of a display frame in [0, 1]; `read_frames` refuses < MIN_CONTRAST."""
    low, high = _robust_range(pixels)
    return high - low


def structure(pixels: NDArray[Any], span: float | None = None) -> float | None:
    """Share of a display frame's robust range that is structure, not pixel noise.

    The frame (a strided sample of it) is averaged over blocks, up to 16 x 16 of them:
    averaging n pixels divides uncorrelated noise by sqrt(n), and leaves anatomy, body
    outline and collimation edges, which are larger than a block. The spread of the
    block means (5th to 95th percentile, so that a burnt-in marker in one block does
    not count) divided by the robust range of the pixels is near 1 for a radiograph and
    about 1 / (block side) for noise. None when the frame is too small to tell, or flat.
    `span` is the frame's `contrast` when the caller has it (else taken on the sample).
    `read_frames` refuses a frame below `MIN_STRUCTURE`.
    """
    step = max(1, int(np.sqrt(pixels.size / _STRUCTURE_SAMPLE)))
    sample = pixels[::step, ::step]
    rows, columns = sample.shape
    if min(rows, columns) < _MIN_STRUCTURE_SIDE:
        return None
    grid = max(4, min(_STRUCTURE_GRID, min(rows, columns) // _MIN_BLOCK))
    block_rows, block_columns = rows // grid, columns // grid
    blocks = np.ascontiguousarray(
        sample[: grid * block_rows, : grid * block_columns], dtype=np.float32
    )
    means = blocks.reshape(grid, block_rows, grid, block_columns).mean(axis=(1, 3))
    if span is None:
        low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
        span = float(high - low)
    if span <= 0:
        return None
    block_low, block_high = np.percentile(means, [5, 95])
    return float(block_high - block_low) / span


def _robust_range(values: NDArray[Any]) -> tuple[float, float]:
    """The LOW_PERCENTILE and HIGH_PERCENTILE values, on a strided sample."""
    step = max(1, int(np.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sample = values[::step, ::step]
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(low), float(high)
