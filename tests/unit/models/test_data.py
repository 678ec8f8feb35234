"""Preprocessing and tf.data pipeline: shapes, ranges, splits, augmentation."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from models import data
from models.preprocess import normalize_images


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float64])
def test_normalize_any_bit_depth_to_unit_range(dtype: type) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    hi = min(info.max, 4095) if info else 1e4
    image: np.ndarray = rng.uniform(0, hi, (300, 200)).astype(dtype)
    out = normalize_images(tf.constant(image.astype(np.float32))[..., None], 64).numpy()
    assert out.shape == (64, 64, 1)
    assert out.min() == 0.0 and out.max() == 1.0


def test_normalize_is_scale_invariant_and_batch_consistent() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (2, 90, 120, 1)).astype(np.float32)
    batch = normalize_images(tf.constant(image), 32).numpy()
    single = normalize_images(tf.constant(image[1]), 32).numpy()
    rescaled = normalize_images(tf.constant(image * 16 + 1000), 32).numpy()
    np.testing.assert_allclose(batch[1], single, atol=1e-6)
    np.testing.assert_allclose(batch, rescaled, atol=1e-4)


def test_normalize_clips_at_the_documented_order_statistics() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 50, (1, 16, 16, 1)).astype(np.float32)  # many ties
    image[0, 0, 0, 0] = 1e6  # an outlier (burnt-in marker) must not set the scale
    out = normalize_images(tf.constant(image), 16).numpy()
    ordered = np.sort(image.ravel())
    lo, hi = ordered[round(0.005 * 255)], ordered[round(0.995 * 255)]
    expected = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_normalize_constant_image_is_zero_not_nan() -> None:
    out = normalize_images(tf.fill((50, 50, 1), 7.0), 16).numpy()
    assert np.all(out == 0.0)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0007-0001.jpeg", "NORMAL2-IM-0007"),
        ("odd.jpeg", "odd"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert data.patient_id(name) == patient


def test_split_keeps_patients_whole_and_is_reproducible() -> None:
    items = [
        data.LabelledImage(Path(f"person{p}_bacteria_{k}.jpeg"), 1)
        for p in range(40)
        for k in range(3)
    ] + [data.LabelledImage(Path(f"IM-{p:04d}-0001.jpeg"), 0) for p in range(20)]
    fit, tune = data.split_by_patient(items, 0.2, seed=3)
    assert {i.patient for i in fit}.isdisjoint({i.patient for i in tune})
    assert len(fit) + len(tune) == len(items)
    assert {i.label for i in tune} == {0, 1}
    assert data.split_by_patient(items, 0.2, seed=3) == (fit, tune)


def test_listing_drops_byte_identical_duplicates(tmp_path: Path, pneumonia_dir: Path) -> None:
    src = sorted((pneumonia_dir / "val" / "NORMAL").iterdir())[:2]
    for cls in data.CLASS_NAMES:
        (tmp_path / cls).mkdir()
    (tmp_path / "NORMAL" / "a.jpeg").write_bytes(src[0].read_bytes())
    (tmp_path / "NORMAL" / "b.jpeg").write_bytes(src[1].read_bytes())
    (tmp_path / "PNEUMONIA" / "c.jpeg").write_bytes(src[0].read_bytes())
    assert [i.path.name for i in data.list_classification(tmp_path)] == ["a.jpeg", "b.jpeg"]
    assert len(data.list_classification(tmp_path, deduplicate=False)) == 3


def test_class_weights_balance_the_classes() -> None:
    w = data.class_weights([0] * 26 + [1] * 74)
    assert w[0] * 26 == pytest.approx(w[1] * 74)


def test_classification_dataset_shapes_and_ranges(pneumonia_dir: Path) -> None:
    items = data.list_classification(pneumonia_dir / "val", deduplicate=False)[:6]
    for training in (False, True):
        ds = data.classification_dataset(items, 48, 4, training=training, seed=1)
        x, y = next(iter(ds))
        assert x.shape == (4, 48, 48, 1) and y.shape == (4, 2)
        assert x.dtype == tf.float32
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
        np.testing.assert_allclose(tf.reduce_sum(y, axis=1).numpy(), 1.0)


def test_augmentation_keeps_shape_and_moves_image_and_mask_together() -> None:
    square = np.zeros((64, 64, 1), np.float32)
    square[10:30, 5:25] = 1.0
    stacked = tf.constant(np.concatenate([square, square], axis=-1))
    outs = [data.random_affine(stacked, tf.constant([s, 9], tf.int64)).numpy() for s in range(8)]
    for out in outs:
        assert out.shape == (64, 64, 2)
        np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    # Different seeds give different transforms (it does augment).
    assert any(not np.allclose(outs[0], o) for o in outs[1:])
    same = data.random_affine(stacked, tf.constant([0, 9], tf.int64)).numpy()
    np.testing.assert_array_equal(outs[0], same)


def test_segmentation_dataset_masks_are_binary(lungs_dir: Path) -> None:
    items = data.list_segmentation(lungs_dir)[:2]
    for training in (False, True):
        x, m = next(iter(data.segmentation_dataset(items, 64, 2, training=training, seed=2)))
        assert x.shape == m.shape == (2, 64, 64, 1)
        assert set(np.unique(m.numpy())) <= {0.0, 1.0}
        assert 0.1 < float(tf.reduce_mean(m)) < 0.7  # lungs cover a plausible fraction


def test_lungs_holdout_is_fixed(lungs_dir: Path) -> None:
    items = data.list_segmentation(lungs_dir)
    held = data.lungs_holdout(items)
    assert len(held) == 7
    assert held == {items[i].image.name for i in range(2, len(items), 5)}


def test_validation_split_is_patient_level_disjoint_and_fixed(pneumonia_dir: Path) -> None:
    items = data.list_classification(pneumonia_dir / "val", deduplicate=False)
    parts = data.split_validation(items)
    sides = [parts.adapt_fit, parts.adapt_select, parts.report]
    patients = [{i.patient for i in side} for side in sides]
    for a in range(3):
        for b in range(a + 1, 3):
            assert patients[a].isdisjoint(patients[b])
    assert sorted(map(str, (i.path for s in sides for i in s))) == sorted(
        str(i.path) for i in items
    )
    assert all({i.label for i in side} == {0, 1} for side in sides)
    # About half of each class's patients is kept for reporting.
    for label in (0, 1):
        total = len({i.patient for i in items if i.label == label})
        held = len({i.patient for i in parts.report if i.label == label})
        assert abs(held - total / 2) <= 1
    assert data.split_validation(items) == parts


def test_resampling_units_are_patients_joined_by_identical_bytes(pneumonia_dir: Path) -> None:
    val = pneumonia_dir / "val"
    names = [
        ("NORMAL", "IM-0033-0001.jpeg"),
        ("NORMAL", "IM-0033-0001-0001.jpeg"),  # same patient
        ("NORMAL", "NORMAL2-IM-0095-0001.jpeg"),
        ("NORMAL", "NORMAL2-IM-0096-0001.jpeg"),  # another name, byte-identical to -0095
        ("PNEUMONIA", "person139_bacteria_661.jpeg"),
        ("PNEUMONIA", "person139_bacteria_662.jpeg"),  # same patient
        ("PNEUMONIA", "person140_bacteria_667.jpeg"),
    ]
    items = [data.LabelledImage(val / c / n, int(c == "PNEUMONIA")) for c, n in names]
    units = data.resampling_units(items)
    assert units[0] == units[1] and units[2] == units[3] and units[4] == units[5]
    assert len(set(units)) == 4


def test_segmentation_units_join_images_of_one_case(lungs_dir: Path) -> None:
    items = data.list_segmentation(lungs_dir)
    unit = dict(
        zip([it.image.name for it in items], data.segmentation_units(lungs_dir, items), strict=True)
    )
    # Admission and day 3 of one Radiopaedia case: one patient.
    assert (
        unit["covid-19-pneumonia-rapidly-progressive-3-days.png"]
        == unit["covid-19-pneumonia-rapidly-progressive-admission.png"]
    )
    assert unit["ARDSSevere.png"] != unit["acute-respiratory-distress-syndrome-ards.png"]
