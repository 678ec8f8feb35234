"""Inference API for the workers: load once, then predict batches of pixel arrays.

Input contract (each image): a 2-D array (H, W) of any numeric dtype and bit depth,
already in display orientation and MONOCHROME2 sense (higher value = brighter = denser).
The caller (the worker) applies the DICOM steps first: Modality LUT, VOI LUT/windowing,
MONOCHROME1 inversion, selection of one frame from a multi-frame object. This module does
the rest with `models.preprocess.normalize_images` (the same function training used):
percentile clip to [0, 1] and a stretch to the model's square input, then batching.

Refused with a ValueError naming the image's index, rather than answered: an array that
is not 2-D, not numeric or has no pixels; NaN or infinite pixels (one percentile turns NaN
and so does the whole image; the classifier then says pneumonia at 0.99999), and an
image without contrast (its robust range is flat, so it normalises to zeros, on which the
classifier says pneumonia at 0.99). Finite float values beyond float32's range are scaled
by a power of two first: exact, and the normalisation is scale-invariant.

Every forward pass goes through a `tf.function` with a fixed input signature, traced once
per model, instead of `model.predict` (which rebuilds its machinery on every call).
Images are grouped by shape (in chunks of `batch_size`) and each group is one compiled call,
preprocessing and network together; a batch of mixed shapes costs one call per shape. The
results are the same as one image at a time (tested) and come back in input order.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from models.architectures import LOGITS_LAYER, build_from_metadata, feature_layers
from models.postprocess import PostProcess, clean_mask
from models.preprocess import normalize_with_contrast
from models.registry import (
    CLASSIFIER_NAME,
    SEGMENTER_NAME,
    SHIPPED_DIR,
    ModelMetadata,
    load_weights,
    metadata_path,
)

#: Compiled entry points take a same-shape batch of raw images (N, H, W) as float32.
_RAW_BATCH = tf.TensorSpec([None, None, None], tf.float32)

#: Largest magnitude (2**64) passed to float32 unscaled: far below float32's maximum (3.4e38),
#: so differences of extreme values (the percentile range) stay finite too.
_MAX_EXPONENT = 64

#: Pneumonia class index in the classifier output ([normal, pneumonia]).
PNEUMONIA = 1


def _load(weights_dir: Path | None, name: str) -> tuple[keras.Model, ModelMetadata]:
    folder = weights_dir or SHIPPED_DIR
    meta = ModelMetadata.read(metadata_path(folder, name))
    model = build_from_metadata(meta.task, meta.input_size, meta.architecture)
    load_weights(model, folder / meta.weights_file, meta.weights_sha256)
    return model, meta


def _validate(images: Sequence[NDArray[Any]]) -> list[NDArray[np.float32]]:
    arrays = [np.asarray(im) for im in images]
    for i, arr in enumerate(arrays):
        if arr.ndim != 2:
            raise ValueError(f"image {i}: expected a 2-D (H, W) array, got shape {arr.shape}")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"image {i}: non-numeric dtype {arr.dtype}")
        if arr.size == 0:  # would reach TF's resize and fail there, without the index
            raise ValueError(f"image {i}: no pixels (shape {arr.shape})")
    return [_as_float32(i, arr) for i, arr in enumerate(arrays)]


def _as_float32(index: int, arr: NDArray[Any]) -> NDArray[np.float32]:
    """`arr` as finite float32: non-finite pixels refused, huge floats scaled by 2**-k."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr.size - int(np.count_nonzero(finite))
        raise ValueError(f"image {index}: {bad} NaN or infinite pixel(s)")
    peak = float(np.max(np.abs(arr)))
    if peak > 2.0**_MAX_EXPONENT:  # exact (a power of two); values it makes subnormal are
        arr = np.ldexp(arr, _MAX_EXPONENT - int(np.frexp(peak)[1]))  # far below any contrast
    return arr.astype(np.float32, copy=False)


def _groups(arrays: Sequence[NDArray[np.float32]], batch_size: int) -> list[list[int]]:
    """Indices grouped by image shape, in chunks of `batch_size`, so each chunk is one call."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, arr in enumerate(arrays):
        by_shape.setdefault(arr.shape, []).append(i)
    chunks: list[list[int]] = []
    for idx in by_shape.values():
        chunks.extend(idx[s : s + batch_size] for s in range(0, len(idx), batch_size))
    return chunks


class _Compiled:
    """A model behind compiled, fixed-signature entry points."""

    def __init__(self, model: keras.Model, meta: ModelMetadata, batch_size: int) -> None:
        self.model = model
        self.metadata = meta
        self.name = meta.name
        self.version = meta.version
        self.input_size = meta.input_size
        self.batch_size = batch_size

    def _batches(
        self, images: Sequence[NDArray[Any]], run: Callable[[Any], Any]
    ) -> list[tuple[list[int], Any]]:
        """Call the compiled `run(raw (N, H, W) float32)` once per same-shape chunk.

        `run` returns (output, contrast per image); an image without contrast is refused.
        """
        arrays = _validate(images)
        results = []
        for chunk in _groups(arrays, self.batch_size):
            raw = tf.constant(np.stack([arrays[i] for i in chunk]))
            output, contrast = run(raw)
            flat = [i for i, ok in zip(chunk, np.asarray(contrast), strict=True) if not ok]
            if flat:
                raise ValueError(
                    f"image {min(flat)}: no contrast (constant or nearly), nothing to analyse"
                )
            results.append((chunk, output))
        return results


class Classifier(_Compiled):
    """Pneumonia triage classifier: probabilities [normal, pneumonia] and Grad-CAM maps."""

    def __init__(self, model: keras.Model, meta: ModelMetadata, batch_size: int = 32) -> None:
        super().__init__(model, meta, batch_size)
        size = meta.input_size
        self.threshold = meta.decision_threshold
        self.temperature = meta.temperature
        logits_model = keras.Model(model.input, model.get_layer(LOGITS_LAYER).output)
        # One feature map per ensemble member and view (just `features` for one network).
        cam_layers = feature_layers(meta.architecture)
        self._cam_flipped = [flipped for _, flipped in cam_layers]
        self._explain_model = keras.Model(
            model.input,
            [model.get_layer(n).output for n, _ in cam_layers]
            + [model.get_layer(LOGITS_LAYER).output],
        )
        inv_t = 1.0 / float(meta.temperature)

        def probabilities(raw: Any) -> Any:
            x, contrast = normalize_with_contrast(raw[..., tf.newaxis], size)
            return tf.nn.softmax(logits_model(x, training=False) * inv_t, axis=-1), contrast

        def gradcam(raw: Any, class_index: Any) -> Any:
            x, contrast = normalize_with_contrast(raw[..., tf.newaxis], size)
            cam = grad_cam(
                self._explain_model, x, class_index, tf.shape(raw)[1:3], self._cam_flipped
            )
            return cam, contrast

        self._probabilities: Any = tf.function(probabilities, input_signature=[_RAW_BATCH])
        self._gradcam: Any = tf.function(
            gradcam, input_signature=[_RAW_BATCH, tf.TensorSpec([], tf.int32)]
        )

    def predict(self, images: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """Softmax probabilities (N, 2), columns [normal, pneumonia], temperature-scaled.

        ValueError for an image outside the input contract (see the module docstring).
        """
        out = np.zeros((len(images), 2), dtype=np.float32)
        for chunk, probs in self._batches(images, self._probabilities):
            out[chunk] = np.asarray(probs)
        return out

    def is_pneumonia(self, probabilities: NDArray[np.float32]) -> NDArray[np.bool_]:
        """Apply the decision threshold chosen on the tune split to `predict` output."""
        return np.asarray(probabilities[:, PNEUMONIA] >= self.threshold)

    def explain(
        self, images: Sequence[NDArray[Any]], class_index: int = PNEUMONIA
    ) -> list[NDArray[np.float32]]:
        """Grad-CAM heatmaps in [0, 1], one per image, each with that image's own shape."""
        out: list[NDArray[np.float32]] = [np.zeros((0, 0), np.float32)] * len(images)
        cls = tf.constant(class_index, tf.int32)
        for chunk, maps in self._batches(images, lambda raw: self._gradcam(raw, cls)):
            for i, m in zip(chunk, np.asarray(maps), strict=True):
                out[i] = m
        return out


def _peak_normalized(cam: Any) -> Any:
    return tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2, 3), keepdims=True))


def grad_cam(
    model: Any,
    x: Any,
    class_index: Any,
    out_size: Any,
    flipped: Sequence[bool] | None = None,
) -> Any:
    """Grad-CAM (Selvaraju et al. 2017) of the class logit w.r.t. the last conv features.

    `model` maps x to (features, ..., logits): one feature map for a single network, one per
    member for an ensemble. Each member's map uses the gradients of the *ensemble's* class
    logit w.r.t. that member's features, is ReLU'd and scaled to [0, 1] per image; the maps
    are averaged and scaled to [0, 1] again (a single network: its own map, unchanged), then
    resized to `out_size` so they overlay the caller's image pixel for pixel. A map whose
    `flipped` entry is true came from the mirrored image and is mirrored back first.
    """
    with tf.GradientTape() as tape:
        *feats, logits = model(x, training=False)
        score = tf.gather(logits, class_index, axis=1)
    grads = tape.gradient(score, feats)
    cams = []
    for f, g, flip in zip(feats, grads, flipped or [False] * len(feats), strict=True):
        weights = tf.reduce_mean(g, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * f, axis=-1, keepdims=True))
        cams.append(_peak_normalized(tf.reverse(cam, axis=[2]) if flip else cam))
    cam = _peak_normalized(tf.add_n(cams) / float(len(cams)))
    cam = tf.image.resize(cam, out_size, method="bilinear")
    return tf.clip_by_value(cam[..., 0], 0.0, 1.0)


class LungSegmenter(_Compiled):
    """Lung U-Net: masks at each input image's own resolution."""

    def __init__(self, model: keras.Model, meta: ModelMetadata, batch_size: int = 8) -> None:
        super().__init__(model, meta, batch_size)
        size = meta.input_size

        def probability_maps(raw: Any) -> Any:
            x, contrast = normalize_with_contrast(raw[..., tf.newaxis], size)
            p = model(x, training=False)
            return tf.image.resize(p, tf.shape(raw)[1:3], method="bilinear")[..., 0], contrast

        self._maps: Any = tf.function(probability_maps, input_signature=[_RAW_BATCH])
        self.threshold = meta.decision_threshold
        self.postprocess = PostProcess.from_dict(meta.postprocess) if meta.postprocess else None

    def predict_proba(self, images: Sequence[NDArray[Any]]) -> list[NDArray[np.float32]]:
        """Lung probability maps in [0, 1], resized back to each input's shape."""
        out: list[NDArray[np.float32]] = [np.zeros((0, 0), np.float32)] * len(images)
        for chunk, maps in self._batches(images, self._maps):
            for i, m in zip(chunk, np.asarray(maps), strict=True):
                out[i] = m
        return out

    def predict(self, images: Sequence[NDArray[Any]]) -> list[NDArray[np.bool_]]:
        """Boolean lung masks (left or right lung), each with its input image's shape.

        The probability map is thresholded, then cleaned by the metadata's post-processing
        rule (`models.postprocess`: the two largest components, holes filled) if it has one.
        """
        masks = [np.asarray(p >= self.threshold) for p in self.predict_proba(images)]
        if self.postprocess is None:
            return masks
        return [clean_mask(m, self.postprocess) for m in masks]


def load_classifier(weights_dir: Path | None = None, batch_size: int = 32) -> Classifier:
    """The pneumonia classifier from `weights_dir` (default: shipped `models/weights/`)."""
    model, meta = _load(weights_dir, CLASSIFIER_NAME)
    return Classifier(model, meta, batch_size)


def load_segmenter(weights_dir: Path | None = None, batch_size: int = 8) -> LungSegmenter:
    """The lung U-Net from `weights_dir` (default: shipped `models/weights/`)."""
    model, meta = _load(weights_dir, SEGMENTER_NAME)
    return LungSegmenter(model, meta, batch_size)
