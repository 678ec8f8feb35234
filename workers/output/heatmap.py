"""Grad-CAM explanation as a Secondary Capture a radiologist can open in any viewer.

Built by `highdicom.sc.SCImage` (SC Image IOD, PS3.3 A.8.1) from the source, so patient
and study are copied and the image files under the same study. The pixels are the
display-ready source frame in grey with a jet-like colour map of the heatmap blended
over it, RGB 8-bit, with "NOT FOR DIAGNOSIS" burned in; Burned In Annotation is YES
(C.7.6.1.1.6) and Image Comments says the same, so the warning survives a viewer that
shows only one of them.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from workers.output.creation import stamp_timezone
from workers.output.errors import OutputError
from workers.output.identity import SERIES, instance_uid, series_uid
from workers.output.results import AlgorithmInfo, ImageResult, OutputContext
from workers.output.source import header
from workers.pixels import frame_spacing

log = logging.getLogger(__name__)

WARNING = "NOT FOR DIAGNOSIS"
#: Heatmap opacity at a heat of 1; lower heat shows more of the image underneath.
MAX_ALPHA = 0.6


def build_heatmap_image(
    result: ImageResult, classifier: AlgorithmInfo, ctx: OutputContext
) -> Dataset:
    """One SC of the heatmap over `result`'s frame (PS3.3 A.8.1), via highdicom."""
    if result.heatmap is None:
        raise OutputError("no heatmap to render")
    rgb = render_heatmap(result.heatmap, result.display)
    frame = result.frame
    models = (classifier.name, classifier.version)
    number, description = SERIES["sc"]
    source = result.source
    orientation = _patient_orientation(source)
    view = header(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=view,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid(ctx.uid_root, "sc", frame, *models),
        series_number=number,
        sop_instance_uid=instance_uid(ctx.uid_root, "sc", [frame], *models),
        instance_number=_instance_number(result),
        manufacturer=ctx.manufacturer,
        # highdicom insists on an orientation in the patient coordinate system; when
        # the source has none we give it one and then empty it below.
        patient_orientation=orientation or ("L", "F"),
        laterality=_laterality(source),
        transfer_syntax_uid=RLELossless,
        series_description=description,
        manufacturer_model_name=ctx.device_name,
        software_versions=ctx.software_version,
        institution_name=ctx.institution_name,
    )
    # `from_ref_dataset` copies only the handful of patient and study attributes it
    # takes as arguments; a PACS that files by Issuer of Patient ID (or checks it) would
    # see the heatmap under another patient than the SEG and SR, which copy the whole
    # Patient, General Study and Patient Study modules. Copy them here too.
    _copy_patient_and_study(sc, view)
    if orientation is None:
        sc["PatientOrientation"].value = None  # Type 2C, empty: unknown (PS3.3 C.7.6.1.1.1)
    if "Laterality" not in sc:
        # Type 2C (PS3.3 C.7.3.1.1.1): dciodvfy errors if absent and only warns if
        # empty; we cannot tell whether the source's body part is paired.
        sc.add_new("Laterality", "CS", None)
    aspect = _pixel_aspect_ratio(result)
    if aspect is not None:
        sc.PixelAspectRatio = aspect
    sc.BurnedInAnnotation = "YES"
    stamp_timezone(sc)
    sc.ImageComments = (
        f"{WARNING}. Grad-CAM heatmap of {classifier.name} {classifier.version}, "
        f"pneumonia probability {result.pneumonia_probability:.3f}."
    )
    sc.DerivationDescription = f"Grad-CAM heatmap by {classifier.name} {classifier.version}"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if result.is_multiframe:
        reference.ReferencedFrameNumber = result.frame_number
    sc.SourceImageSequence = [reference]
    return sc


def render_heatmap(
    heatmap: NDArray[np.floating], display: NDArray[np.floating] | None
) -> NDArray[np.uint8]:
    """RGB uint8 of the grey `display` with `heatmap` blended in jet colours, labelled."""
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if display is None:
        grey = np.zeros_like(heat)
    else:
        grey = np.clip(np.nan_to_num(np.asarray(display, dtype=np.float32)), 0.0, 1.0)
        if grey.shape != heat.shape:
            raise OutputError(f"display {grey.shape} and heatmap {heat.shape} differ")
    alpha = (MAX_ALPHA * heat)[..., None]
    blended = (1.0 - alpha) * grey[..., None] + alpha * _jet(heat)
    rgb = np.round(blended * 255.0).astype(np.uint8)
    return _burn_label(rgb, WARNING)


def _jet(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """A jet-like colour map: blue -> cyan -> yellow -> red over [0, 1]."""
    channels = [np.clip(1.5 - np.abs(4.0 * x - centre), 0.0, 1.0) for centre in (3.0, 2.0, 1.0)]
    return np.stack(channels, axis=-1).astype(np.float32)


def _burn_label(rgb: NDArray[np.uint8], text: str) -> NDArray[np.uint8]:
    """Burn `text` white on black into the top-left corner, scaled to the image.

    Pillow's default bitmap font is about 11 px high; it is drawn once small and
    enlarged by an integer factor (nearest neighbour) so it stays crisp and legible on
    a 2k detector image.
    """
    rows, cols = rgb.shape[:2]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = (int(v) for v in probe.textbbox((0, 0), text))
    pad = 2
    small = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(small).text((pad - left, pad - top), text, fill=255)
    scale = max(1, min(cols // (4 * small.width), rows // (8 * small.height)))
    label = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    width, height = min(label.width, cols), min(label.height, rows)
    mask = np.asarray(label, dtype=np.uint8)[:height, :width] > 127
    out = rgb.copy()
    corner = out[:height, :width]
    corner[...] = 0
    corner[mask] = 255
    return out


def _copy_patient_and_study(sc: hd.sc.SCImage, view: Dataset) -> None:
    """The source's Patient and Study IE modules, as highdicom copies them into a SEG."""
    try:
        sc.copy_patient_and_study_information(view)
    except KeyError:
        # A SOP Class highdicom has no IOD table for: the attributes `from_ref_dataset`
        # copied (name, ID, birth date, sex, study identity) are all there is.
        log.warning(
            "patient/study modules of sop_class_uid=%s not known; copied the basics",
            view.SOPClassUID,
        )


def _pixel_aspect_ratio(result: ImageResult) -> list[int] | None:
    """Pixel Aspect Ratio (row:column) of the source frame when it is not 1:1.

    An SC has no pixel spacing, so without it a viewer shows the heatmap of a
    non-square-pixel image distorted against the image itself; it is Type 1C in the
    Image Pixel module exactly then (PS3.3 C.7.6.3.1.7).
    """
    spacing, _ = frame_spacing(result.source, result.frame_number)
    if spacing is None:
        stated = result.source.get("PixelAspectRatio")
        try:
            ratio = [int(v) for v in stated] if stated is not None else []
        except (TypeError, ValueError):
            return None
        usable = len(ratio) == 2 and all(v > 0 for v in ratio) and ratio[0] != ratio[1]
        return ratio if usable else None
    rows, columns = spacing
    if math.isclose(rows, columns, rel_tol=1e-6):
        return None
    exact = (Fraction(str(rows)) / Fraction(str(columns))).limit_denominator(1000)
    return [exact.numerator, exact.denominator]


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation if highdicom accepts it (one letter per axis)."""
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    pair = (str(value[0]), str(value[1]))
    letters = {v.value for v in hd.PatientOrientationValuesBiped}
    return pair if all(p in letters for p in pair) else None


def _laterality(source: Dataset) -> str | None:
    """Laterality of the source series, or its Image Laterality when that is R or L."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "")
        if value in {"R", "L"}:
            return value
    return None


def _instance_number(result: ImageResult) -> int:
    if result.is_multiframe:
        return result.frame_number
    value = result.source.get("InstanceNumber")
    try:
        return max(1, int(value)) if value is not None else 1
    except (TypeError, ValueError):
        return 1
