"""Card metrics against independent computations on inputs with known answers.

The references here are written from the definitions (pairwise AUC, kappa from the
confusion matrix, F1 = 2TP / (2TP + FP + FN)), not from `models.evaluate`.
"""

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from models.evaluate import (
    bootstrap_ci,
    choose_threshold,
    classification_metrics,
    dice_iou,
    roc_auc,
)


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties, over all pairs."""
    diff = scores[labels == 1][:, None] - scores[labels == 0][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = rng.integers(0, 2, 30)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 4, 30) / 3.0  # many ties
        assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "auc"),
    [([0.1, 0.2, 0.8, 0.9], 1.0), ([0.9, 0.8, 0.2, 0.1], 0.0), ([0.5, 0.5, 0.5, 0.5], 0.5)],
    ids=["perfect", "inverted", "all-tied"],
)
def test_auc_known_answers(scores: list[float], auc: float) -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array(scores)) == auc


def test_auc_of_one_class_is_undefined() -> None:
    assert math.isnan(roc_auc(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9])))


def test_confusion_matrix_orientation_and_positive_class() -> None:
    # Positive = pneumonia (label 1); rows = truth [normal, pneumonia], columns = prediction.
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.3, 0.6, 0.8, 0.9, 0.95])
    m = classification_metrics(labels, scores, 0.5)
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]  # [[TN, FP], [FN, TP]]
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    p_o, p_e = 6 / 8, (5 * 5 + 3 * 3) / 64
    assert m["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert m["n"] == 8


def test_threshold_is_inclusive() -> None:
    m = classification_metrics(np.array([0, 1]), np.array([0.2, 0.5]), 0.5)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_perfect_and_inverted_classifiers() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = classification_metrics(labels, np.array([0.1, 0.2, 0.8, 0.9]), 0.5)
    assert (perfect["accuracy"], perfect["f1"], perfect["kappa"]) == (1.0, 1.0, 1.0)
    inverted = classification_metrics(labels, np.array([0.9, 0.8, 0.2, 0.1]), 0.5)
    assert inverted["accuracy"] == 0.0 and inverted["kappa"] == -1.0
    # No true positive but positives present: F1 is 0 (2TP / (2TP + FP + FN)), not undefined.
    # NaN here was silently dropped from the bootstrap, biasing the F1 interval upwards.
    assert inverted["f1"] == 0.0


def test_f1_when_nothing_is_called_positive() -> None:
    m = classification_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.5)
    assert math.isnan(m["precision"])  # no positive calls: PPV undefined
    assert m["f1"] == 0.0 and m["sensitivity"] == 0.0


def test_all_one_class() -> None:
    m = classification_metrics(np.array([1, 1, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert m["confusion_matrix"] == [[0, 0], [1, 3]]
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"])
    assert m["sensitivity"] == 0.75 and m["f1"] == pytest.approx(6 / 7)
    assert m["kappa"] == 0.0  # observed agreement equals chance agreement


def test_dice_iou_known_answers() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(0.5) and iou == pytest.approx(1 / 3)
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(a, ~a) == (0.0, 0.0)
    empty = np.zeros((3, 3), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)  # documented: both empty agree perfectly
    assert dice_iou(empty, ~empty) == (0.0, 0.0)


def _mean_stat(values: np.ndarray) -> Callable[[np.ndarray], dict[str, Any]]:
    return lambda idx: {"mean": float(values[idx].mean())}


def test_bootstrap_resamples_whole_units() -> None:
    """Copies of a case inside its own unit add no information: the interval must not shrink.

    Each of 30 patients contributes 4 identical images. Resampling images would treat them
    as 120 independent cases and halve the interval; resampling patients gives exactly the
    interval of the 30 distinct cases (same seed, same draws).
    """
    rng = np.random.default_rng(1)
    per_patient = rng.integers(0, 2, 30).astype(float)
    images = np.repeat(per_patient, 4)
    patients = [p for p in range(30) for _ in range(4)]
    alone = bootstrap_ci(_mean_stat(per_patient), 30, ["mean"], n_boot=500)
    by_patient = bootstrap_ci(_mean_stat(images), 120, ["mean"], n_boot=500, units=patients)
    by_image = bootstrap_ci(_mean_stat(images), 120, ["mean"], n_boot=500)
    assert by_patient == alone
    assert by_image["mean"][1] - by_image["mean"][0] < 0.7 * (alone["mean"][1] - alone["mean"][0])


def test_bootstrap_is_seeded_and_percentile() -> None:
    values = np.arange(10, dtype=float)
    a = bootstrap_ci(_mean_stat(values), 10, ["mean"], n_boot=300, seed=5)
    assert a == bootstrap_ci(_mean_stat(values), 10, ["mean"], n_boot=300, seed=5)
    # Reference: the same draws by hand, then the 2.5th and 97.5th percentiles.
    rng = np.random.default_rng(5)
    means = [values[rng.integers(0, 10, 10)].mean() for _ in range(300)]
    assert a["mean"] == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def _youden(scores: np.ndarray, labels: np.ndarray, t: float) -> float:
    return float((scores[labels == 1] >= t).mean() + (scores[labels == 0] < t).mean() - 1.0)


def test_threshold_reaches_the_best_youden_j_when_two_plateaus_tie() -> None:
    # J = 0.5 for t in (0.3, 0.5] and for t in (0.6, 0.7]; between them J = 0. The midpoint
    # of the outer ends (0.525) used to be returned: J 0, the worst threshold available.
    scores = np.array([0.3, 0.5, 0.6, 0.7])
    labels = np.array([0, 1, 0, 1])
    t = choose_threshold(scores, labels)
    assert _youden(scores, labels, t) == pytest.approx(0.5)
    assert 0.3 < t <= 0.5  # the tie goes to the lower threshold: more sensitive, for triage


def test_threshold_always_reaches_the_best_youden_j() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        labels = rng.integers(0, 2, 12)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 10, 12) / 10.0
        grid = np.unique(np.concatenate([[0.0, 1.0], scores]))
        best = max(_youden(scores, labels, m) for m in (grid[:-1] + grid[1:]) / 2)
        t = choose_threshold(scores, labels)
        assert _youden(scores, labels, t) == pytest.approx(best)


def test_threshold_is_the_middle_of_a_single_best_plateau() -> None:
    scores = np.array([0.1, 0.2, 0.8, 0.9])  # separable: J = 1 for t in (0.2, 0.8]
    assert choose_threshold(scores, np.array([0, 0, 1, 1])) == pytest.approx(0.5)
