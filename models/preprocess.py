"""The one intensity and size normalisation shared by training and inference.

Training/inference skew is the classic failure of deployed imaging models, so the
tf.data pipeline (`models.data`) and the inference API (`models.inference`) both call
`normalize_images` and nothing else.

Input contract: pixel values in display orientation and MONOCHROME2 sense (higher value =
brighter = denser), any numeric dtype and bit depth, cast to float32 by the caller. The
DICOM steps (Modality LUT, VOI LUT, MONOCHROME1 inversion, frame selection) belong to the
caller. Images are resized to a square without keeping the aspect ratio, because the
training images (224x224 copies of the Kermany set) were stretched the same way.
"""

from typing import Any

import tensorflow as tf

#: Percentiles clipped before scaling to [0, 1]: robust to burnt-in text, markers and
#: the long tails of 12-16 bit detectors, where min/max scaling would be driven by a few
#: pixels.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def normalize_images(images: Any, size: int) -> Any:
    """Resize to (size, size) and map the robust intensity range to [0, 1].

    `images` is a float32 tensor (H, W, 1) or (N, H, W, 1); the result has the same rank
    with spatial size (size, size). Resizing comes first so that the percentile sort runs
    on size*size pixels whatever the detector resolution.
    """
    return normalize_with_contrast(images, size)[0]


def normalize_with_contrast(images: Any, size: int) -> tuple[Any, Any]:
    """`normalize_images`, and per image whether it had any contrast to normalise.

    The flag (bool, shape (N,) or scalar) is false for an image whose robust range is
    flat: it maps to zeros, an input the networks were never trained on (the shipped
    classifier calls zeros 99% pneumonia), so inference refuses it instead of answering.
    """
    single = images.shape.rank == 3
    x = images[tf.newaxis] if single else images
    x = tf.image.resize(tf.cast(x, tf.float32), (size, size), method="bilinear", antialias=True)
    flat = tf.reshape(x, (tf.shape(x)[0], size * size))
    n = size * size
    lo_idx = round(LOW_PERCENTILE / 100.0 * (n - 1))
    hi_idx = round(HIGH_PERCENTILE / 100.0 * (n - 1))
    # Order statistics sorted[lo_idx] and sorted[hi_idx] via two partial top-k selections:
    # the same values as a full sort, about 10x cheaper (the sort dominated inference cost).
    lo = -tf.math.top_k(-flat, lo_idx + 1, sorted=True).values[:, lo_idx]
    hi = tf.math.top_k(flat, n - hi_idx, sorted=True).values[:, n - 1 - hi_idx]
    lo = lo[:, tf.newaxis, tf.newaxis, tf.newaxis]
    hi = hi[:, tf.newaxis, tf.newaxis, tf.newaxis]
    # A (near-)constant image has no contrast to keep: it maps to zeros, not to amplified
    # float rounding noise from the resize, nor to NaN.
    flat_range = hi - lo <= 1e-5 * tf.maximum(tf.abs(hi), tf.abs(lo)) + 1e-12
    scale = tf.where(flat_range, tf.ones_like(hi), hi - lo)
    out = tf.where(flat_range, 0.0, tf.clip_by_value((x - lo) / scale, 0.0, 1.0))
    contrast = tf.logical_not(flat_range[:, 0, 0, 0])
    return (out[0], contrast[0]) if single else (out, contrast)


def resize_masks(masks: Any, size: int) -> Any:
    """Resize binary masks (values 0/1 or 0/255) to (size, size) as float32 {0, 1}."""
    m = tf.cast(masks, tf.float32)
    m = m / tf.maximum(tf.reduce_max(m), 1.0)
    m = tf.image.resize(m, (size, size), method="bilinear", antialias=True)
    return tf.cast(m >= 0.5, tf.float32)
