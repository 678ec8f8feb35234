"""Weights and metadata: save/load gives identical outputs; float16 storage stays close."""

from pathlib import Path

import keras
import numpy as np
import pytest

from models.architectures import build_classifier, build_unet
from models.inference import Classifier, load_classifier
from models.registry import ModelMetadata, load_weights, save_weights, write_model


def _meta(**kw: object) -> ModelMetadata:
    base: dict[str, object] = {
        "name": "pneumonia-triage",
        "version": "0.0.1",
        "task": "classification",
        "input_size": 48,
        "architecture": {"backbone": "cxrnet", "widths": [8, 16], "dense_units": [8, 8]},
        "class_names": ["normal", "pneumonia"],
        "decision_threshold": 0.5,
        "weights_file": "",
        "weights_sha256": "",
        "weights_dtype": "float32",
    }
    base.update(kw)
    return ModelMetadata(**base)  # type: ignore[arg-type]


def _randomize_bn(model: keras.Model, seed: int) -> None:
    """Non-trivial BN statistics, so a loader that skips them would be caught."""
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            w + rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.ndim == 1 else w
            for w in model.get_weights()
        ]
    )


def test_classifier_round_trip_is_identical(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier(48, widths=(8, 16), dense_units=(8, 8))
    _randomize_bn(model, 0)
    meta = write_model(model, _meta(), tmp_path)
    assert (tmp_path / "pneumonia-triage.json").is_file()
    assert ModelMetadata.read(tmp_path / "pneumonia-triage.json") == meta

    loaded = load_classifier(tmp_path)
    original = Classifier(model, meta)
    images = [
        np.random.default_rng(i).integers(0, 4096, (70, 90)).astype(np.uint16) for i in range(3)
    ]
    np.testing.assert_array_equal(loaded.predict(images), original.predict(images))
    x = np.random.default_rng(5).uniform(size=(2, 48, 48, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.model(x, training=False), model(x, training=False))
    assert loaded.name == "pneumonia-triage" and loaded.version == "0.0.1"


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    model = build_classifier(48, widths=(8, 16), dense_units=(8, 8))
    meta = write_model(model, _meta(), tmp_path)
    path = tmp_path / meta.weights_file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_classifier(tmp_path)


def test_float16_storage_keeps_unet_outputs(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_unet(64, base_filters=8, depth=3)
    _randomize_bn(model, 1)
    twin = build_unet(64, base_filters=8, depth=3)
    save_weights(model, tmp_path / "w.npz", dtype="float16")
    load_weights(twin, tmp_path / "w.npz")
    x = np.random.default_rng(2).uniform(size=(2, 64, 64, 1)).astype(np.float32)
    p32 = np.asarray(model(x, training=False))
    p16 = np.asarray(twin(x, training=False))
    assert np.abs(p32 - p16).max() < 5e-3
    assert ((p32 >= 0.5) == (p16 >= 0.5)).mean() > 0.995
