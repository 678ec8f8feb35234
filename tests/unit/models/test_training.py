"""A tiny training run on a few real images must lower the loss (no test trains fully)."""

from pathlib import Path

import keras
import numpy as np

from models import data
from models.architectures import build_classifier, build_unet
from models.losses import dice_bce_loss
from models.train import configure_runtime


def _first_and_last_loss(model: keras.Model, ds: object, epochs: int) -> tuple[float, float]:
    """Training loss of the first step (initial weights) and of the last one."""
    losses = model.fit(ds, steps_per_epoch=1, epochs=epochs, verbose=0, shuffle=False)
    losses = losses.history["loss"]
    return float(losses[0]), float(np.mean(losses[-2:]))


def test_tiny_classifier_run_lowers_loss(pneumonia_dir: Path) -> None:
    configure_runtime(1)
    items = data.list_classification(pneumonia_dir / "val", deduplicate=False)
    few = items[:8] + items[-8:]
    ds = data.classification_dataset(few, 64, 16, training=False).repeat()
    model = build_classifier(64, "cxrnet", widths=(8, 16), dense_units=(32, 32))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
    before, after = _first_and_last_loss(model, ds, epochs=30)
    assert np.isfinite(after) and after < 0.9 * before


def test_tiny_unet_run_lowers_loss(lungs_dir: Path) -> None:
    configure_runtime(1)
    items = data.list_segmentation(lungs_dir)[:4]
    ds = data.segmentation_dataset(items, 64, 4, training=False).repeat()
    model = build_unet(64, base_filters=4, depth=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=dice_bce_loss)
    before, after = _first_and_last_loss(model, ds, epochs=10)
    assert np.isfinite(after) and after < 0.9 * before


def test_same_seed_same_weights(pneumonia_dir: Path) -> None:
    """A fixed seed makes a run reproducible: shuffling, augmentation, init, dropout."""
    items = data.list_classification(pneumonia_dir / "val", deduplicate=False)[::20]

    def run() -> list[np.ndarray]:
        configure_runtime(7)
        ds = data.classification_dataset(items, 32, 4, training=True, seed=7)
        model = build_classifier(32, "cxrnet", widths=(4, 8), dense_units=(8, 8))
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
        return [np.asarray(w) for w in model.get_weights()]

    for a, b in zip(run(), run(), strict=True):
        np.testing.assert_array_equal(a, b)
