"""PNG renderings for the browser: a stored image, and the model overlays on top of it.

Pixels come from :func:`workers.pixels.read_instance` (pydicom and numpy only, the
same grey levels the models saw); overlays from the worker's .npy arrays. Overlays
are transparent PNGs the page stretches over the image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from node.errors import NodeError
from workers.pixels import UnreadablePixels, read_instance


class ImageUnavailable(NodeError):
    """A stored image or overlay cannot be rendered (no pixels, unreadable array)."""


def _png(array: NDArray[np.uint8]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", optimize=False, compress_level=3)
    return out.getvalue()


def image_png(path: Path, frame: int = 1) -> bytes:
    """Frame ``frame`` (1-based) of the instance at ``path`` as an 8-bit greyscale PNG.

    Every frame is shown as it is, a blank or noise-only exposure too: which frames
    the models could analyse is not the viewer's question.
    """
    try:
        frames = read_instance(path, for_display=True).frames
    except UnreadablePixels as exc:
        raise ImageUnavailable(f"cannot render image: {exc.reason}") from None
    chosen = next((f for f in frames if f.frame_number == frame), None)
    if chosen is None:
        raise ImageUnavailable(f"no frame {frame} (the image has {len(frames)})")
    pixels = np.clip(chosen.pixels, 0.0, 1.0)
    return _png((pixels * 255.0 + 0.5).astype(np.uint8))


def _load(path: Path) -> NDArray[np.float32]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImageUnavailable(f"cannot read overlay array: {type(exc).__name__}") from None
    array = np.squeeze(np.asarray(array, dtype=np.float32))
    if array.ndim != 2:
        raise ImageUnavailable(f"overlay array has shape {array.shape}, expected 2-D")
    return array


def mask_png(path: Path) -> bytes:
    """The lung mask as translucent green where the mask is set."""
    mask = _load(path) > 0.5
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (40, 220, 90, 110)
    return _png(rgba)


def heatmap_png(path: Path) -> bytes:
    """The Grad-CAM heatmap in a blue-to-red scale, more opaque where it is hotter."""
    heat = _load(path)
    low, high = float(np.min(heat)), float(np.max(heat))
    h = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * h - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    rgba = np.empty((*h.shape, 4), dtype=np.uint8)
    rgba[..., :3] = (rgb * 255.0).astype(np.uint8)
    rgba[..., 3] = (np.clip(h, 0.0, 1.0) * 170.0).astype(np.uint8)
    return _png(rgba)
