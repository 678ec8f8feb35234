"""Grad-CAM: aligned with each input image and pointing at the evidence for the class."""

import keras
import numpy as np
from keras import layers

from models.architectures import FEATURES_LAYER, LOGITS_LAYER
from models.inference import Classifier
from models.registry import ModelMetadata

SIZE = 32


def _lesion_model() -> keras.Model:
    """A model whose pneumonia logit is driven by bright blobs, by construction.

    Feature channel 0 responds to brightness (a 3x3 mean filter of the input); channel 1 to
    darkness. The pneumonia logit weighs channel 0 positively and channel 1 negatively, so a
    bright lesion is the evidence Grad-CAM must find; the normal logit is the opposite.
    """
    inputs = keras.Input((SIZE, SIZE, 1))
    conv = layers.Conv2D(2, 3, padding="same", name="conv")
    feats = layers.Activation("relu", name=FEATURES_LAYER)(conv(inputs))
    pooled = layers.GlobalAveragePooling2D()(feats)
    dense = layers.Dense(2, name=LOGITS_LAYER)
    logits = dense(pooled)
    model = keras.Model(inputs, layers.Softmax()(logits))
    kernel = np.zeros((3, 3, 1, 2), np.float32)
    kernel[..., 0, 0] = 1.0 / 9.0
    kernel[..., 0, 1] = -1.0 / 9.0
    conv.set_weights([kernel, np.array([0.0, 1.0], np.float32)])
    dense.set_weights([np.array([[-4.0, 4.0], [4.0, -4.0]], np.float32), np.zeros(2, np.float32)])
    return model


def _classifier() -> Classifier:
    meta = ModelMetadata(
        name="toy",
        version="0",
        task="classification",
        input_size=SIZE,
        architecture={},
        class_names=["normal", "pneumonia"],
        decision_threshold=0.5,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
    )
    return Classifier(_lesion_model(), meta)


def _image_with_lesion(shape: tuple[int, int], box: tuple[slice, slice]) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.normal(300.0, 20.0, shape)
    image[box] = 900.0
    return image.astype(np.int16)


def test_gradcam_shape_range_and_lesion_localisation() -> None:
    clf = _classifier()
    # Non-square images of different shapes, lesion off-centre (top right / bottom left).
    boxes = [(slice(20, 60), slice(140, 190)), (slice(150, 200), slice(10, 50))]
    shapes = [(240, 200), (220, 160)]
    images = [_image_with_lesion(s, b) for s, b in zip(shapes, boxes, strict=True)]
    maps = clf.explain(images)
    for image, cam, box in zip(images, maps, boxes, strict=True):
        assert cam.shape == image.shape
        assert cam.min() >= 0.0 and cam.max() <= 1.0 and cam.max() > 0.99
        inside = np.zeros(image.shape, bool)
        inside[box] = True
        assert cam[inside].mean() > 4 * cam[~inside].mean()
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        assert inside[peak]


def test_gradcam_for_the_other_class_avoids_the_lesion() -> None:
    clf = _classifier()
    box = (slice(20, 60), slice(140, 190))
    image = _image_with_lesion((240, 200), box)
    cam = clf.explain([image], class_index=0)[0]
    inside = np.zeros(image.shape, bool)
    inside[box] = True
    assert cam[inside].mean() < cam[~inside].mean()
