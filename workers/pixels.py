"""Stored DICOM instance to model input: decode, then the grayscale display pipeline.

The models (`models.inference`) take 2-D arrays in display orientation and MONOCHROME2
sense. This module is the DICOM half of that contract (PS3.4 N.2.1, the grayscale
transformations): Modality LUT (PS3.3 C.11.1) -> VOI LUT or window (C.11.2) -> inversion
of MONOCHROME1 (C.7.6.3.1.2), one array per frame, values in [0, 1].

Decoding is pydicom's, with whatever pixel data plugins are installed (pylibjpeg with
openjpeg, libjpeg and rle; pyjpegls; GDCM if present), so every transfer syntax pydicom
reads is covered, deflate and big endian included. The LUT steps are pydicom's
`pydicom.pixels` functions; this module only chooses which to apply and scales their
output range to [0, 1].

Decisions:

* **Colour is refused.** The CR and DX IODs allow only MONOCHROME1/2 (PS3.3 C.8.1.2,
  C.8.11.3.1.1); a colour chest image is a screenshot or secondary capture that the
  models were never checked on, so RGB, YBR_* and PALETTE COLOR raise `UnreadablePixels`.
* **VOI:** a VOI LUT Sequence wins over a window (pydicom's ``prefer_lut``); the first
  of several windows or LUTs is used (the modality's default view, PS3.3 C.11.2.1.2);
  without either, or with an unusable one, the frame's own minimum and maximum map
  linearly to [0, 1]: an affine map clips nothing, so the model (whose normalisation
  is affine-invariant) sees exactly what it would see on the stored values.
* **Inversion** follows Photometric Interpretation only. DX requires Presentation LUT
  Shape INVERSE exactly when the image is MONOCHROME1 (PS3.3 C.8.11.6.1.2): both say
  the same thing, so inverting for each would invert twice.
* **Float pixel data** (Float/Double Float Pixel Data) has no Modality or VOI LUT
  that pydicom applies; it gets the robust range. NaN and infinities are clamped.
* **1-bit** pixel data is unpacked by pydicom and treated like any other grayscale.
* **Size limits** are checked on the header before anything is decoded.

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
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.pixels.utils import iter_pixels

from node.errors import NodeError

log = logging.getLogger(__name__)

#: Robust intensity range used when the instance has no usable VOI (percent).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

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
)

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
    "PixelSpacing" (calibrated to the patient), "ImagerPixelSpacing" (at the detector,
    PS3.3 C.8.11.7, used only without PixelSpacing), "PixelMeasuresSequence" (enhanced
    multi-frame) or None when absent or zero. ``voi_source`` records which VOI step
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


def read_frames(
    path: Path, *, max_pixels: int = 30_000_000, max_frames: int | None = None
) -> list[ImageFrame]:
    """Decode the stored instance at `path` into display-ready frames.

    `max_pixels` bounds Rows x Columns of one frame and `max_frames` the number of
    frames (None: no limit); both are checked on the header before decoding. Frames are
    decoded one at a time, so peak memory is the dataset, a few float copies of one
    frame, and the float32 results.

    Raises `UnreadablePixels`, and nothing else, for any file whose pixels cannot become
    model input.
    """
    uid = ""
    ds: Dataset | None = None
    try:
        ds = dcmread(path, force=True)
        uid = str(ds.get("SOPInstanceUID", "") or "")
        nr_frames = _check_header(ds, max_pixels=max_pixels, max_frames=max_frames)
        is_float = "PixelData" not in ds
        frames = []
        for index, raw in enumerate(iter_pixels(ds, indices=range(nr_frames))):
            try:
                view, spacing, spacing_source = _frame_view(ds, index)
                pixels, voi_source = _display(raw, view, is_float=is_float, uid=uid)
            except (UnreadablePixels, MemoryError):
                raise
            except Exception as exc:
                reason = f"grayscale transformations failed: {_one_line(exc)}"
                raise UnreadablePixels(reason) from exc
            frames.append(
                ImageFrame(
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
            )
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
    log.debug("decoded sop_instance_uid=%s frames=%d", uid, len(frames))
    return frames


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


def _spacing(view: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing (PS3.3 10.7.1.3)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = [float(v) for v in view.get(keyword) or ()]
        except (TypeError, ValueError):
            continue
        if len(value) == 2 and all(np.isfinite(v) and v > 0 for v in value):
            return (value[0], value[1]), keyword
    return None, None


def _display(
    raw: NDArray[Any], view: Dataset, *, is_float: bool, uid: str
) -> tuple[NDArray[np.float32], str]:
    """Modality LUT -> VOI -> [0, 1] -> MONOCHROME1 inversion, for one 2-D frame."""
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
        values = apply_modality_lut(raw, view)
        unit, source = _voi_unit(values, view, uid)
    if str(view.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32), source


def _voi_unit(values: NDArray[Any], view: Dataset, uid: str) -> tuple[NDArray[Any], str]:
    """Apply the first VOI LUT or window and scale its output range to [0, 1].

    The output range is taken from pydicom's own function rather than re-derived: a
    window is probed with -inf and +inf (giving its y_min and y_max, PS3.3 C.11.2.1.2),
    a LUT with every input it maps.
    """
    try:
        if _has_voi_lut(view):
            item = view.VOILUTSequence[0]
            entries, first_map = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
            outputs = apply_voi(np.arange(first_map, first_map + entries), view)
            indices = np.rint(values).astype(np.int64)
            return _scale(apply_voi(indices, view), outputs.min(), outputs.max()), "VOILUTSequence"
        if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
            low, high = apply_windowing(np.array([-np.inf, np.inf]), view)
            if np.isfinite(low) and np.isfinite(high) and low != high:
                return _scale(apply_windowing(values, view), low, high), "window"
    except (ValueError, NotImplementedError, TypeError, IndexError, AttributeError) as exc:
        log.warning(
            "unusable VOI, using full range sop_instance_uid=%s reason=%s",
            uid,
            _one_line(exc),
        )
    return _scale(values, float(values.min()), float(values.max())), "full range"


def _has_voi_lut(view: Dataset) -> bool:
    sequence = view.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _scale(values: NDArray[Any], low: float, high: float) -> NDArray[Any]:
    """Map `low` to 0 and `high` to 1 (either order), clipped."""
    if low == high:
        return np.zeros(values.shape, np.float32)
    out = (values.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_unit(values: NDArray[Any]) -> NDArray[Any]:
    """Percentile range to [0, 1]; min-max if that is flat; zeros for a constant image."""
    step = max(1, int(np.sqrt(values.size / _PERCENTILE_SAMPLE)))
    sample = values[::step, ::step]
    low, high = (float(v) for v in np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return _scale(values, low, high)
