"""Inference API input contract: any size, any bit depth, order kept, 2-D, finite, not flat."""

from pathlib import Path
from typing import Literal

import keras
import numpy as np
import pytest

from models.architectures import build_classifier, build_unet
from models.inference import Classifier, LungSegmenter
from models.registry import ModelMetadata


def _meta(task: Literal["classification", "segmentation"], size: int) -> ModelMetadata:
    return ModelMetadata(
        name="toy",
        version="0",
        task=task,
        input_size=size,
        architecture={},
        class_names=["normal", "pneumonia"],
        decision_threshold=0.5,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
    )


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    keras.utils.set_random_seed(0)
    model = build_classifier(48, widths=(8, 16), dense_units=(8, 8))
    return Classifier(model, _meta("classification", 48), batch_size=2)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (100, 80)).astype(np.uint8),
        rng.integers(0, 4095, (300, 300)).astype(np.uint16),
        rng.integers(-1000, 3000, (100, 80)).astype(np.int16),
        rng.uniform(0, 1, (64, 64)),
        rng.integers(0, 255, (100, 80)).astype(np.uint8),
    ]


def test_predict_any_size_and_dtype_keeps_order(classifier: Classifier) -> None:
    images = _images()
    probs = classifier.predict(images)
    assert probs.shape == (5, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([classifier.predict([im]) for im in images])
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)


def test_bit_depth_does_not_change_the_answer(classifier: Classifier) -> None:
    image8 = np.random.default_rng(3).integers(0, 255, (120, 90)).astype(np.uint8)
    image16 = image8.astype(np.uint16) * 257
    np.testing.assert_allclose(
        classifier.predict([image8]), classifier.predict([image16]), atol=1e-5
    )


def test_explain_shapes(classifier: Classifier) -> None:
    maps = classifier.explain(_images())
    assert [m.shape for m in maps] == [im.shape for im in _images()]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 3)), np.zeros(7), np.array([["a"]]), np.zeros((0, 5)), np.zeros((0, 0))],
)
def test_rejects_non_2d_non_numeric_or_empty(classifier: Classifier, bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="image 0"):
        classifier.predict([bad])


# -- refused rather than answered: non-finite pixels, no contrast -----------------------
# One NaN in 200 pixels made the whole normalised image NaN and the classifier answer
# pneumonia at 0.99999; a constant image normalises to zeros (0.99 pneumonia shipped).


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_pixels_are_refused_naming_the_image(
    classifier: Classifier, bad: float, dtype: type[np.floating]
) -> None:
    image = np.random.default_rng(1).uniform(0, 1, (40, 30)).astype(dtype)
    image[3, 4] = bad
    good = _images()[0]
    for call in (classifier.predict, classifier.explain):
        with pytest.raises(ValueError, match=r"image 1: 1 NaN or infinite pixel"):
            call([good, image])


def test_float64_beyond_float32_range_gives_the_same_answer(classifier: Classifier) -> None:
    image = np.random.default_rng(4).uniform(-1, 1, (60, 50))
    huge = image * 2.0**1000  # inf once cast to float32
    probs = classifier.predict([huge])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, classifier.predict([image]), atol=1e-5)
    np.testing.assert_allclose(
        classifier.explain([huge])[0], classifier.explain([image])[0], atol=1e-4
    )


@pytest.mark.parametrize(
    "flat",
    [np.zeros((50, 40)), np.full((30, 30), 7, np.int16), np.ones((64, 64), bool)],
    ids=["zeros", "constant", "all-true"],
)
def test_image_without_contrast_is_refused_naming_it(
    classifier: Classifier, flat: np.ndarray
) -> None:
    seg = LungSegmenter(build_unet(32, base_filters=4, depth=2), _meta("segmentation", 32))
    for call in (classifier.predict, classifier.explain, seg.predict_proba):
        with pytest.raises(ValueError, match=r"image 2: no contrast"):
            call([*_images()[:2], flat])


def test_segmenter_masks_have_each_input_shape() -> None:
    keras.utils.set_random_seed(0)
    seg = LungSegmenter(build_unet(32, base_filters=4, depth=2), _meta("segmentation", 32))
    images = _images()
    masks = seg.predict(images)
    assert [m.shape for m in masks] == [im.shape for im in images]
    assert all(m.dtype == np.bool_ for m in masks)
    probs = seg.predict_proba(images)
    np.testing.assert_array_equal(masks[0], probs[0] >= 0.5)


def test_classifier_module_has_no_dicom_imports() -> None:
    source = (Path(__file__).resolve().parents[3] / "models" / "inference.py").read_text()
    assert "pydicom" not in source and "pynetdicom" not in source
