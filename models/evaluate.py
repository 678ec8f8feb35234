"""Metrics, bootstrap confidence intervals, calibration, and threshold/temperature choice.

Pure NumPy so the numbers in a model card can be recomputed without a TF install.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def roc_auc(labels: IntArray, scores: FloatArray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half)."""
    labels = np.asarray(labels)
    pos, neg = int(labels.sum()), int(len(labels) - labels.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def classification_metrics(
    labels: IntArray, scores: FloatArray, threshold: float
) -> dict[str, Any]:
    """The issue's metric set for a binary task (positive = pneumonia)."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(scores) >= threshold).astype(int)
    tp = int(((pred == 1) & (labels == 1)).sum())
    tn = int(((pred == 0) & (labels == 0)).sum())
    fp = int(((pred == 1) & (labels == 0)).sum())
    fn = int(((pred == 0) & (labels == 1)).sum())
    n = len(labels)

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    sens, spec, prec = ratio(tp, tp + fn), ratio(tn, tn + fp), ratio(tp, tp + fp)
    acc = ratio(tp + tn, n)
    p_yes = ratio(tp + fp, n) * ratio(tp + fn, n) + ratio(tn + fn, n) * ratio(tn + fp, n)
    return {
        "accuracy": acc,
        "auc": roc_auc(labels, scores),
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        # From the counts, not from precision and recall: with no true positive but some
        # positives or positive calls F1 is 0, where the harmonic mean would give 0/0 or NaN.
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "kappa": ratio(acc - p_yes, 1.0 - p_yes),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": n,
    }


def bootstrap_ci(
    statistic: Callable[[NDArray[np.int64]], dict[str, Any]],
    n: int,
    keys: list[str],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    units: Sequence[int] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs: resample independent units, recompute, take the quantiles.

    `units[i]` is the resampling unit of case i (e.g. its patient): whole units are drawn
    with replacement and every case of a drawn unit goes in (cluster bootstrap). Images of
    one patient are not independent, so resampling them one by one would understate the
    uncertainty. Without `units` every case is its own unit.
    """
    rng = np.random.default_rng(seed)
    if units is None:
        members = [np.array([i], dtype=np.int64) for i in range(n)]
    else:
        if len(units) != n:
            raise ValueError(f"{len(units)} units for {n} cases")
        _, unit_index = np.unique(np.asarray(units), return_inverse=True)
        members = [np.flatnonzero(unit_index == u) for u in range(int(unit_index.max()) + 1)]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), len(members))
        stats = statistic(np.concatenate([members[u] for u in drawn]))
        for k in keys:
            samples[k].append(float(stats[k]))
    out = {}
    for k, values in samples.items():
        arr = np.asarray(values)
        arr = arr[~np.isnan(arr)]
        lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if len(arr) else (np.nan, np.nan)
        out[k] = (float(lo), float(hi))
    return out


@dataclass(frozen=True)
class Calibration:
    brier: float
    ece: float
    table: list[dict[str, float]]


def calibration(labels: IntArray, scores: FloatArray, n_bins: int = 10) -> Calibration:
    """Brier score, expected calibration error and the reliability table (equal-width bins)."""
    labels = np.asarray(labels).astype(float)
    scores = np.asarray(scores, dtype=float)
    bins = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    table, ece = [], 0.0
    for b in range(n_bins):
        sel = bins == b
        if not sel.any():
            continue
        conf, freq = float(scores[sel].mean()), float(labels[sel].mean())
        ece += sel.mean() * abs(conf - freq)
        table.append(
            {
                "bin_low": b / n_bins,
                "bin_high": (b + 1) / n_bins,
                "n": int(sel.sum()),
                "mean_predicted": conf,
                "observed": freq,
            }
        )
    return Calibration(float(np.mean((scores - labels) ** 2)), float(ece), table)


def fit_temperature(logits: FloatArray, labels: IntArray) -> float:
    """Temperature minimising the negative log-likelihood (grid then refine; 1-D, convex)."""
    logits = np.asarray(logits, dtype=float)
    labels = np.asarray(labels).astype(int)

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 200))
    best = float(grid[np.argmin([nll(t) for t in grid])])
    fine = np.linspace(best * 0.95, best * 1.05, 41)
    return float(fine[np.argmin([nll(t) for t in fine])])


def choose_threshold(scores: FloatArray, labels: IntArray) -> float:
    """Threshold maximising Youden's J (sensitivity + specificity - 1) on the tune split.

    The midpoint of the best plateau is taken, so a tune set that separates perfectly does
    not push the threshold to the edge of one class. When separate plateaus tie, the lowest
    one wins (the most sensitive: a missed pneumonia costs a triage list more than a false
    alarm); the midpoint of the outer ends could fall between them, where J is lower.
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(int)
    candidates = np.unique(np.concatenate([[0.0, 1.0], scores]))
    mids = (candidates[:-1] + candidates[1:]) / 2.0
    pos, neg = labels == 1, labels == 0
    j = np.array([(scores[pos] >= t).mean() + (scores[neg] < t).mean() - 1.0 for t in mids])
    best = np.flatnonzero(j >= j.max() - 1e-12)
    # The first run of consecutive best intervals: one plateau, with J at its maximum inside.
    gaps = np.flatnonzero(np.diff(best) > 1)
    last = best[gaps[0]] if len(gaps) else best[-1]
    return float((mids[best[0]] + mids[last]) / 2.0)


def dice_iou(pred: NDArray[np.bool_], truth: NDArray[np.bool_]) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both empty counts as perfect agreement)."""
    inter = float(np.logical_and(pred, truth).sum())
    union = float(np.logical_or(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / union
