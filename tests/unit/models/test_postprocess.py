"""Lung-mask post-processing: spurious islands go, holes are filled, lungs stay."""

from dataclasses import replace

import keras
import numpy as np

from models.architectures import build_unet
from models.inference import LungSegmenter
from models.postprocess import PostProcess, clean_mask, fill_holes, label_components
from models.registry import ModelMetadata


def _two_lungs() -> np.ndarray:
    mask = np.zeros((120, 100), bool)
    mask[10:100, 8:45] = True  # right lung (image left)
    mask[10:95, 55:92] = True  # left lung, a little smaller
    return mask


def test_small_blob_is_removed_and_hole_filled() -> None:
    lungs = _two_lungs()
    noisy = lungs.copy()
    noisy[108:112, 70:74] = True  # gastric bubble / label: 16 px, well under 5% of a lung
    noisy[40:50, 20:30] = False  # a hole inside the right lung (dense consolidation)
    cleaned = clean_mask(noisy)
    np.testing.assert_array_equal(cleaned, lungs)


def test_only_the_two_largest_components_are_kept() -> None:
    mask = _two_lungs()
    third = mask.copy()
    third[102:118, 40:60] = True  # a third region, 320 px (> 5% of a lung, still third)
    _, n = label_components(third)
    assert n == 3
    np.testing.assert_array_equal(clean_mask(third), mask)


def test_small_second_lung_is_kept_above_the_fraction() -> None:
    mask = np.zeros((100, 100), bool)
    mask[5:95, 5:60] = True  # 4,950 px
    mask[40:60, 75:90] = True  # 300 px: 6% of the largest, kept by the 5% rule
    np.testing.assert_array_equal(clean_mask(mask), mask)
    dropped = clean_mask(mask, replace(PostProcess(), min_fraction=0.1))
    assert not dropped[40:60, 75:90].any() and dropped[5:95, 5:60].all()


def test_connectivity_and_border_touching_background() -> None:
    diagonal = np.eye(6, dtype=bool)
    assert label_components(diagonal, 8)[1] == 1
    assert label_components(diagonal, 4)[1] == 6
    # A notch open to the border is not a hole; an enclosed pocket is.
    ring = np.zeros((20, 20), bool)
    ring[2:18, 2:18] = True
    ring[8:12, 8:12] = False
    ring[0:10, 15:16] = False  # a channel from the top border into the mask
    filled = fill_holes(ring)
    assert filled[8:12, 8:12].all() and not filled[2:10, 15].any()


def test_empty_and_full_masks() -> None:
    assert not clean_mask(np.zeros((10, 10), bool)).any()
    assert clean_mask(np.ones((10, 10), bool)).all()


def test_segmenter_applies_the_rule_from_its_metadata() -> None:
    keras.utils.set_random_seed(0)
    meta = ModelMetadata(
        name="toy",
        version="0",
        task="segmentation",
        input_size=32,
        architecture={},
        class_names=["lung"],
        decision_threshold=0.5,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
    )
    model = build_unet(32, base_filters=4, depth=2)
    plain = LungSegmenter(model, meta)
    cleaned = LungSegmenter(model, replace(meta, postprocess=PostProcess().to_dict()))
    image = np.random.default_rng(0).integers(0, 255, (64, 48)).astype(np.uint8)
    raw = plain.predict([image])[0]
    np.testing.assert_array_equal(cleaned.predict([image])[0], clean_mask(raw))
    assert PostProcess.from_dict(PostProcess().to_dict()) == PostProcess()
