"""Blank and noise-only frames: refused alone, skipped inside a multi-frame instance.

A failed exposure is often not flat but detector noise around one level. Stretched to
the display range it has as much contrast as a radiograph, and the classifier would
score it; what it lacks is structure larger than a pixel (`workers.pixels.structure`).
Every real image in ../shared/data must still be read.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from node.web.images import ImageUnavailable, image_png
from tests.unit.workers.conftest import PATIENT, build
from workers.pixels import (
    MIN_STRUCTURE,
    UnreadablePixels,
    read_frames,
    read_instance,
    structure,
)

Write = Callable[[Dataset], Path]

#: (rows, columns) of the synthetic exposures: a small detector, a CR plate, a DR panel.
SIZES = [(64, 64), (300, 256), (1200, 1000)]
#: Detector noise around one level: Gaussian of a few widths, Poisson, and white noise
#: over the whole stored range (the worst case: full contrast, no structure).
NOISE = ["gauss-0.4", "gauss-3", "gauss-40", "poisson", "uniform"]


def _noise(shape: tuple[int, int], bits: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    level = top // 3
    if kind == "poisson":
        values = rng.poisson(level, shape).astype(np.float64)
    elif kind == "uniform":
        values = rng.integers(0, top + 1, shape).astype(np.float64)
    else:
        values = np.rint(level + rng.normal(0.0, float(kind.split("-")[1]), shape))
    return np.clip(values, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _exposure(values: np.ndarray, bits: int, **attributes: object) -> Dataset:
    """A CR of `values` with `bits` stored bits and no window: the full range is shown."""
    return build(values, BitsStored=bits, HighBit=bits - 1, **attributes)


def _chest_like(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Two dark lung fields in a bright body, with detector noise: structure at every scale."""
    rows, cols = shape
    y, x = np.ogrid[:rows, :cols]
    lungs = np.zeros(shape, bool)
    for centre in (0.3, 0.7):
        lungs |= ((x - cols * centre) / (cols * 0.15)) ** 2 + (
            (y - rows * 0.5) / (rows * 0.3)
        ) ** 2 < 1
    values = np.where(lungs, 900.0, 2500.0) + np.random.default_rng(seed).normal(0, 40, shape)
    return np.clip(values, 0, 4095).astype(np.uint16)


# -- defect 1: a noise-only exposure is not an image --------------------------------------


@pytest.mark.parametrize("kind", NOISE)
@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_noise_only_exposure_is_refused(
    write: Write, shape: tuple[int, int], bits: int, kind: str
) -> None:
    ds = _exposure(_noise(shape, bits, kind), bits)
    with pytest.raises(UnreadablePixels, match=r"no image structure \(blank or failed exposure"):
        read_frames(write(ds))


def test_noise_under_its_own_window_is_refused(write: Write) -> None:
    values = _noise((300, 256), 12, "gauss-3")
    ds = _exposure(values, 12, WindowCenter=1365, WindowWidth=20)
    with pytest.raises(UnreadablePixels, match=r"no image structure.*\(window\)"):
        read_frames(write(ds))


def test_noise_with_a_burnt_in_marker_is_refused(write: Write) -> None:
    values = _noise((300, 256), 12, "gauss-3")
    values[5:12, 5:14] = 4095  # an "L" marker: a few blocks brighter, still no image
    with pytest.raises(UnreadablePixels, match="no image structure"):
        read_frames(write(_exposure(values, 12)))


def test_noisy_low_contrast_image_is_read(write: Write) -> None:
    """Structure a few noise widths deep is an image, however little of the range it uses."""
    values = _chest_like((300, 256))
    values = (1000 + (values - 900) // 100).astype(np.uint16)  # 17 grey levels in 4096
    (frame,) = read_frames(write(_exposure(values, 12)))
    assert structure(frame.pixels) > 2 * MIN_STRUCTURE


def test_too_small_to_tell_is_not_judged() -> None:
    """A frame under 48 pixels a side cannot average noise away: no verdict, not a refusal."""
    assert structure(np.random.default_rng(0).random((40, 40), np.float32)) is None


def test_structure_is_cheap_on_a_large_detector() -> None:
    """Given the frame's contrast, as `read_frames` does: well under 1 ms (10 ms allowed)."""
    frame = np.random.default_rng(0).random((3000, 3000), np.float32)
    structure(frame, 0.99)
    start = time.perf_counter()
    for _ in range(5):
        structure(frame, 0.99)
    assert (time.perf_counter() - start) / 5 < 0.01


def test_no_real_image_in_the_shared_data_lacks_structure(shared_data: Path) -> None:
    """Every CXR (both sets) and every frame of every readable DICOM file passes, with margin."""
    paths = sorted((shared_data / "cxr-pneumonia").rglob("*.jpeg"))
    paths += sorted((shared_data / "cxr-lungs" / "images").glob("*.png"))
    assert len(paths) > 5500
    lowest = {"cxr": 1.0, "dicom": 1.0}
    for p in paths:
        with Image.open(p) as image:
            score = structure(np.asarray(image.convert("L"), np.float32) / 255.0)
        assert score is not None and score >= MIN_STRUCTURE, p.name
        lowest["cxr"] = min(lowest["cxr"], score)
    read = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted((shared_data / "dicom").rglob("*.dcm")):
            try:
                instance = read_instance(path)
            except UnreadablePixels as exc:
                assert "structure" not in exc.reason, path.name
                continue
            assert not instance.skipped, path.name
            read += 1
            for frame in instance.frames:
                score = structure(frame.pixels)
                if score is not None:
                    lowest["dicom"] = min(lowest["dicom"], score)
    assert read >= 25
    # Measured: CXR >= 0.34, DICOM frames >= 0.26; noise-only frames <= 0.09.
    assert min(lowest.values()) > 1.5 * MIN_STRUCTURE


# -- defect 2: one unusable frame does not make a multi-frame instance unreadable --------


def _multi_frame(write: Write, blank: set[int], frames: int = 4) -> tuple[Path, Dataset]:
    stack = np.stack([_chest_like((128, 128), seed=i) for i in range(frames)])
    for index in blank:
        stack[index] = _noise((128, 128), 12, "gauss-3", seed=index) if index % 2 else 2048
    ds = _exposure(stack, 12)
    return write(ds), ds


def test_blank_frames_are_skipped_and_counted(
    write: Write, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path, ds = _multi_frame(write, blank={1, 2})
    instance = read_instance(path)
    assert [f.frame_number for f in instance.frames] == [1, 4]
    assert [s.frame_number for s in instance.skipped] == [2, 3]
    assert "no image structure" in instance.skipped[0].reason  # frame 2: noise
    assert "no usable contrast" in instance.skipped[1].reason  # frame 3: flat
    assert [f.frame_number for f in read_frames(path)] == [1, 4]
    assert f"sop_instance_uid={ds.SOPInstanceUID} skipped=2 of 4" in caplog.text
    for value in PATIENT.values():
        assert value not in caplog.text


def test_no_usable_frame_fails_the_instance_with_the_reasons(write: Write) -> None:
    path, _ = _multi_frame(write, blank={0, 1, 2}, frames=3)
    with pytest.raises(UnreadablePixels) as raised:
        read_instance(path)
    reason = raised.value.reason
    assert reason.startswith("no frame can be analysed (3 of 3 skipped)")
    assert "frame 1: no usable contrast" in reason and "frame 2: no image structure" in reason


def test_a_single_frame_keeps_its_own_reason(write: Write) -> None:
    with pytest.raises(UnreadablePixels, match=r"^no usable contrast \(blank or failed exposure"):
        read_frames(write(build(np.full((8, 8), 700, np.uint16))))


# -- the viewer shows every frame as it is -----------------------------------------------


def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_viewer_shows_frames_the_models_skip_at_their_own_numbers(write: Write) -> None:
    """Frames 2 and 3 are skipped for the models; the viewer's frame 4 is still frame 4."""
    path, _ = _multi_frame(write, blank={1, 2})
    shown = read_instance(path, for_display=True)
    assert [f.frame_number for f in shown.frames] == [1, 2, 3, 4] and not shown.skipped
    for number in (1, 2, 3, 4):
        expected = np.clip(shown.frames[number - 1].pixels, 0.0, 1.0) * 255.0 + 0.5
        assert np.array_equal(_png_pixels(image_png(path, number)), expected.astype(np.uint8))
    # Frame 4 is a chest-like frame, not the (skipped) noise of frame 2 or 3.
    assert structure(shown.frames[3].pixels) > MIN_STRUCTURE
    with pytest.raises(ImageUnavailable, match="no frame 5"):
        image_png(path, 5)


def test_viewer_renders_a_noise_only_exposure(write: Write) -> None:
    """A failed exposure is refused as model input, but a reader sees it as it is."""
    path = write(_exposure(_noise((300, 256), 12, "gauss-3"), 12))
    with pytest.raises(UnreadablePixels):
        read_frames(path)
    assert _png_pixels(image_png(path)).shape == (300, 256)
