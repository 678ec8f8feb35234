"""The shipped weights: integrity, size limit, and scores on fixed slices of held-out data.

The slices are the first 20 NORMAL and 20 PNEUMONIA files of `val/` by sorted name, and
the lung hold-out listed in the metadata; the bounds sit below the measured values in the
model cards, with room for the small-sample noise of 40 and 4 images.

Since pneumonia-triage 1.1.0 was fine-tuned on the adapt half of `val/`
(`models.data.split_validation`), the 40-image slice is no longer unseen: 18 of its images
are in adapt-fit, 11 in adapt-select and only 11 in the report half. In 1.2.0 (two
cross-fitted members) every one of those 29 adapt images was trained on by one member and
used for choices by the other. These tests check integrity and regressions, not
generalisation; the card's val-report numbers are the honest ones.
"""

from pathlib import Path

import numpy as np
import pytest

from models import data
from models.inference import load_classifier, load_segmenter
from models.registry import CLASSIFIER_NAME, SEGMENTER_NAME, SHIPPED_DIR, ModelMetadata, sha256_of
from models.report import evaluate_classifier_dir, evaluate_segmenter_dir, read_grayscale

MAX_BYTES = 20 * 1024 * 1024


@pytest.mark.parametrize("name", [CLASSIFIER_NAME, SEGMENTER_NAME])
def test_shipped_files_are_intact_small_and_carded(name: str) -> None:
    meta = ModelMetadata.read(SHIPPED_DIR / f"{name}.json")
    weights = SHIPPED_DIR / meta.weights_file
    assert weights.stat().st_size < MAX_BYTES
    assert sha256_of(weights) == meta.weights_sha256
    assert meta.name == name and meta.version.count(".") == 2
    assert (SHIPPED_DIR.parent / "cards" / f"{name}.md").is_file()


def test_no_stray_files_in_weights_dir() -> None:
    for path in SHIPPED_DIR.iterdir():
        assert path.stat().st_size < MAX_BYTES, path.name
        assert path.name.endswith((".json", ".weights.npz")), path.name


def test_classifier_on_fixed_val_slice(val_slice: Path) -> None:
    report = evaluate_classifier_dir(val_slice, n_boot=50)
    assert report["n"] == 40
    # 1.0.0 measured: AUC 0.9925, accuracy 0.80, sensitivity 1.0, specificity 0.60, Brier 0.077.
    # 1.1.0 measured: AUC 1.0, accuracy 0.975, specificity 0.95, Brier 0.037; 1.2.0: AUC 1.0,
    # accuracy 0.975 (1 FP), sensitivity 1.0, Brier 0.018. 29 of the 40 images are adapt
    # images (module docstring), so these are regression bounds: below what a model that
    # had seen none of them (1.0.0) reached, except accuracy, where they catch a threshold
    # or calibration slip of the adapted models.
    assert report["auc"] >= 0.95
    assert report["accuracy"] >= 0.85
    assert report["sensitivity"] >= 0.90
    assert 0.0 <= report["calibration"]["brier"] <= 0.10


def test_classifier_outputs_are_probabilities(val_slice: Path) -> None:
    clf = load_classifier()
    images = [read_grayscale(p) for p in sorted((val_slice / "PNEUMONIA").iterdir())[:4]]
    probs = clf.predict(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    maps = clf.explain(images[:2])
    assert [m.shape for m in maps] == [im.shape for im in images[:2]]


def test_segmenter_on_lung_holdout(lungs_dir: Path) -> None:
    seg = load_segmenter()
    held = seg.metadata.training_data["held_out"]
    assert set(held) == data.lungs_holdout(data.list_segmentation(lungs_dir))
    report = evaluate_segmenter_dir(lungs_dir, holdout_only=True, n_boot=50, limit=4)
    assert report["n"] == 4
    # 1.0.0 measured 0.888 on these 4 images, 1.2.0 (post-processing) 0.927.
    assert report["dice"] >= 0.89
