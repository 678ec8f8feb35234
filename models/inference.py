"""Inference API for the workers: load once, then predict batches of pixel arrays.

Input contract (each image): a 2-D array (H, W) of any numeric dtype and bit depth,
already in display orientation and MONOCHROME2 sense (higher value = brighter = denser).
The caller (the worker) applies the DICOM steps first: Modality LUT, VOI LUT/windowing,
MONOCHROME1 inversion, selection of one frame from a multi-frame object. This module does
the rest with `models.preprocess.normalize_images` (the same function training used):
percentile clip to [0, 1] and a stretch to the model's square input, then batching.

Every forward pass goes through a `tf.function` with a fixed input signature, traced once
per model, instead of `model.predict` (which rebuilds its machinery on every call).
Images of one shape are preprocessed together in the same compiled call; mixed shapes are
preprocessed one by one and batched for the network.
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
from models.preprocess import normalize_images
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
    return [a.astype(np.float32, copy=False) for a in arrays]


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
        """Call the compiled `run(raw (N, H, W) float32)` once per same-shape chunk."""
        arrays = _validate(images)
        results = []
        for chunk in _groups(arrays, self.batch_size):
            raw = tf.constant(np.stack([arrays[i] for i in chunk]))
            results.append((chunk, run(raw)))
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
            x = normalize_images(raw[..., tf.newaxis], size)
            return tf.nn.softmax(logits_model(x, training=False) * inv_t, axis=-1)

        def gradcam(raw: Any, class_index: Any) -> Any:
            x = normalize_images(raw[..., tf.newaxis], size)
            return grad_cam(
                self._explain_model, x, class_index, tf.shape(raw)[1:3], self._cam_flipped
            )

        self._probabilities: Any = tf.function(probabilities, input_signature=[_RAW_BATCH])
        self._gradcam: Any = tf.function(
            gradcam, input_signature=[_RAW_BATCH, tf.TensorSpec([], tf.int32)]
        )

    def predict(self, images: Sequence[NDArray[Any]]) -> NDArray[np.float32]:
        """Softmax probabilities (N, 2), columns [normal, pneumonia], temperature-scaled."""
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
            x = normalize_images(raw[..., tf.newaxis], size)
            p = model(x, training=False)
            return tf.image.resize(p, tf.shape(raw)[1:3], method="bilinear")[..., 0]

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
