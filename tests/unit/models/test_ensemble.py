"""Cross-fitted ensemble: one model from two members, same API, OOF threshold."""

from pathlib import Path

import keras
import numpy as np
import pytest

from models import data
from models.architectures import build_classifier, build_ensemble, build_from_metadata, member_views
from models.ensemble import oof_threshold
from models.evaluate import choose_threshold
from models.inference import Classifier, load_classifier
from models.registry import ModelMetadata, write_model
from models.train import adapt_roles

SIZE = 48
SMALL = {"widths": (8, 16), "dense_units": (8, 8)}
TEMPERATURES = [1.5, 2.5]


def _meta() -> ModelMetadata:
    return ModelMetadata(
        name="pneumonia-triage",
        version="0.0.1",
        task="classification",
        input_size=SIZE,
        architecture={
            "backbone": "cxrnet",
            "widths": [8, 16],
            "dense_units": [8, 8],
            "ensemble": 2,
            "member_temperatures": TEMPERATURES,
        },
        class_names=["normal", "pneumonia"],
        decision_threshold=0.5,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
    )


def _members(temperatures: list[float] = TEMPERATURES, seed: int = 0) -> list[keras.Model]:
    """One small perturbed classifier per temperature, reproducible from ``seed``."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed + 1)
    members = []
    for _ in temperatures:
        m = build_classifier(SIZE, **SMALL)  # type: ignore[arg-type]
        m.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in m.get_weights()])
        members.append(m)
    return members


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [
        rng.integers(0, 4096, (70, 90)).astype(np.uint16),
        rng.integers(0, 255, (64, 64)).astype(np.uint8),
        rng.integers(0, 4096, (70, 90)).astype(np.uint16),
    ]


@pytest.fixture(scope="module")
def ensemble() -> keras.Model:
    model = build_ensemble(SIZE, TEMPERATURES, **SMALL)  # type: ignore[arg-type]
    for view, member in zip(member_views(model), _members(), strict=True):
        view.set_weights(member.get_weights())
    return model


def test_ensemble_is_the_mean_of_calibrated_member_logits(ensemble: keras.Model) -> None:
    x = np.random.default_rng(3).uniform(size=(4, SIZE, SIZE, 1)).astype(np.float32)
    logits = [
        np.asarray(keras.Model(m.input, m.get_layer("logits").output)(x, training=False)) / t
        for m, t in zip(_members(), TEMPERATURES, strict=True)
    ]
    z = (logits[0] + logits[1]) / 2.0
    expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ensemble(x, training=False)), expected, atol=1e-5)


def test_ensemble_round_trip_is_identical(ensemble: keras.Model, tmp_path: Path) -> None:
    meta = write_model(ensemble, _meta(), tmp_path)
    rebuilt = build_from_metadata("classification", SIZE, meta.architecture)
    assert len(rebuilt.get_weights()) == len(ensemble.get_weights())
    loaded = load_classifier(tmp_path)
    original = Classifier(ensemble, meta)
    images = _images()
    np.testing.assert_array_equal(loaded.predict(images), original.predict(images))
    for a, b in zip(loaded.explain(images), original.explain(images), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / meta.weights_file).stat().st_size < 2 * 1024 * 1024


def test_ensemble_gradcam_has_each_input_shape(ensemble: keras.Model) -> None:
    clf = Classifier(ensemble, _meta())
    images = _images()
    probs = clf.predict(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert clf.is_pneumonia(probs).shape == (3,)
    maps = clf.explain(images)
    assert [m.shape for m in maps] == [im.shape for im in images]
    assert all(m.min() >= 0.0 and m.max() <= 1.0 for m in maps)


def test_ensemble_needs_two_members_and_matching_temperatures() -> None:
    with pytest.raises(ValueError, match="two members"):
        build_ensemble(SIZE, [1.0], **SMALL)  # type: ignore[arg-type]
    arch = {**_meta().architecture, "member_temperatures": [1.0]}
    with pytest.raises(ValueError, match="member temperatures"):
        build_from_metadata("classification", SIZE, arch)


def test_oof_threshold_pools_the_members_out_of_fold_scores() -> None:
    rng = np.random.default_rng(4)
    labels = [rng.integers(0, 2, 30), rng.integers(0, 2, 20)]
    scores = [np.clip(y * 0.6 + rng.uniform(0, 0.5, len(y)), 0, 1) for y in labels]
    threshold, metrics = oof_threshold(scores, labels)
    assert threshold == choose_threshold(np.concatenate(scores), np.concatenate(labels))
    assert metrics["n"] == 50
    assert {"accuracy", "auc", "brier", "ece", "nll"} <= set(metrics)
    with pytest.raises(ValueError):
        oof_threshold(scores, labels[:1])


def test_adapt_folds_swap_roles() -> None:
    def item(i: int) -> data.LabelledImage:
        return data.LabelledImage(Path(f"person{i}_bacteria_{i}.jpeg"), 1)

    split = data.ValidationSplit([item(1)], [item(2)], [item(3)])
    assert adapt_roles(split, "a") == ([item(1)], [item(2)])
    assert adapt_roles(split, "b") == ([item(2)], [item(1)])
    with pytest.raises(ValueError, match="fold"):
        adapt_roles(split, "c")


def test_flip_tta_ensemble_is_mirror_invariant(tmp_path: Path) -> None:
    model = build_ensemble(SIZE, TEMPERATURES, hflip_tta=True, **SMALL)  # type: ignore[arg-type]
    for view, member in zip(member_views(model), _members(), strict=True):
        view.set_weights(member.get_weights())
    meta = _meta()
    meta.architecture["hflip_tta"] = True
    meta = write_model(model, meta, tmp_path)
    clf = load_classifier(tmp_path)
    images = _images()
    mirrored = [im[:, ::-1].copy() for im in images]
    np.testing.assert_allclose(clf.predict(images), clf.predict(mirrored), atol=1e-5)
    for cam, cam_m in zip(clf.explain(images), clf.explain(mirrored), strict=True):
        np.testing.assert_allclose(cam, cam_m[:, ::-1], atol=1e-4)
    # The same members without TTA score only the image as given.
    plain = Classifier(build_ensemble(SIZE, TEMPERATURES, **SMALL), _meta())  # type: ignore[arg-type]
    assert len(plain.model.get_weights()) == len(clf.model.get_weights())


TEMPERATURES3 = [1.5, 2.5, 1.2]


@pytest.mark.parametrize("tta", [False, True])
def test_three_member_ensemble_round_trip_and_gradcam(tta: bool, tmp_path: Path) -> None:
    members = _members(TEMPERATURES3, seed=5)
    model = build_ensemble(SIZE, TEMPERATURES3, hflip_tta=tta, **SMALL)  # type: ignore[arg-type]
    views = member_views(model)
    assert len(views) == 3
    for view, member in zip(views, members, strict=True):
        view.set_weights(member.get_weights())
    x = np.random.default_rng(7).uniform(size=(4, SIZE, SIZE, 1)).astype(np.float32)
    if not tta:
        z = np.mean(
            [
                np.asarray(keras.Model(m.input, m.get_layer("logits").output)(x, training=False))
                / t
                for m, t in zip(members, TEMPERATURES3, strict=True)
            ],
            axis=0,
        )
        expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-5)
    meta = _meta()
    meta.architecture.update(ensemble=3, member_temperatures=TEMPERATURES3, hflip_tta=tta)
    meta = write_model(model, meta, tmp_path)
    loaded = load_classifier(tmp_path)
    original = Classifier(model, meta)
    images = _images()
    np.testing.assert_array_equal(loaded.predict(images), original.predict(images))
    maps = loaded.explain(images)
    assert [m.shape for m in maps] == [im.shape for im in images]
    assert all(m.min() >= 0.0 and m.max() <= 1.0 for m in maps)
    for a, b in zip(maps, original.explain(images), strict=True):
        np.testing.assert_array_equal(a, b)


def _val_items() -> list[data.LabelledImage]:
    """A synthetic val/ listing: patients with 1-4 images, a few with both classes."""
    rng = np.random.default_rng(8)
    items = []
    for p in range(120):
        label = int(p % 3 != 0)
        for j in range(int(rng.integers(1, 5))):
            lab = 1 - label if p % 17 == 0 and j == 1 else label
            kind = "bacteria" if lab else "normal"
            items.append(data.LabelledImage(Path(f"person{p}_{kind}_{j}.jpeg"), lab))
    return items


def test_adapt_kfold_is_a_patient_level_partition_of_adapt_only() -> None:
    split = data.split_validation(_val_items())
    folds = data.adapt_kfold(split.adapt, 3)
    assert len(folds) == 3
    names = [str(it.path) for part in folds for it in part]
    assert sorted(names) == sorted(str(it.path) for it in split.adapt)  # each exactly once
    patients = [{it.patient for it in part} for part in folds]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not patients[i] & patients[j]
    report = {str(it.path) for it in split.report}
    assert not report & set(names)
    for label in (0, 1):
        sizes = [sum(it.label == label for it in part) for part in folds]
        assert max(sizes) - min(sizes) <= 4  # stratified, balanced by images
    assert data.adapt_kfold(split.adapt, 3) == folds  # seeded
    for k in range(3):
        fit, select = adapt_roles(split, str(k), 3)
        assert select == folds[k]
        assert sorted(str(it.path) for it in fit + select) == sorted(
            str(it.path) for it in split.adapt
        )
        assert not {it.patient for it in fit} & {it.patient for it in select}
        assert not {str(it.path) for it in fit} & report
    with pytest.raises(ValueError, match="fold"):
        adapt_roles(split, "3", 3)
    with pytest.raises(ValueError, match="fold"):
        adapt_roles(split, "a", 3)
    with pytest.raises(ValueError, match="2 folds"):
        data.adapt_kfold(split.adapt, 1)
