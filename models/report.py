"""Evaluation reports: run a model through the inference API over a labelled folder.

Going through `models.inference` (not the Keras model directly) means the numbers describe
exactly what the workers will run, preprocessing included.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from models import data as data_mod
from models.evaluate import bootstrap_ci, calibration, classification_metrics, dice_iou
from models.inference import PNEUMONIA, load_classifier, load_segmenter

#: Seed of every card's bootstrap: the same report gives the same interval.
BOOTSTRAP_SEED = 0
CI_KEYS = ["accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "kappa"]
T = TypeVar("T")


def read_grayscale(path: Path) -> np.ndarray[Any, Any]:
    """A JPEG/PNG as a 2-D float32 array, decoded exactly as the training pipeline does."""
    return np.asarray(data_mod.decode_grayscale(str(path)))[..., 0]


def _chunks(items: Sequence[T], size: int, show: bool, what: str) -> Iterator[Sequence[T]]:
    starts = range(0, len(items), size)
    for start in track(starts, description=what, disable=not show, console=Console(stderr=True)):
        yield items[start : start + size]


def evaluate_classifier_dir(
    data_dir: Path,
    weights_dir: Path | None = None,
    *,
    n_boot: int = 2000,
    show_progress: bool = False,
    limit_per_class: int | None = None,
    split: Literal["adapt", "report"] | str | None = None,
) -> dict[str, Any]:
    """Metrics (with 95% bootstrap CIs) and calibration on `data_dir/{NORMAL,PNEUMONIA}`.

    No deduplication here: an evaluation folder is scored as given, every file once. With
    `split`, only that half of the folder's patient-level `data_mod.split_validation`.
    """
    clf = load_classifier(weights_dir)
    items = data_mod.list_classification(data_dir, deduplicate=False)
    if split is not None:
        parts = data_mod.split_validation(items)
        if split not in ("adapt", "report"):
            raise ValueError(f"unknown split {split!r}")
        items = parts.adapt if split == "adapt" else parts.report
    if limit_per_class is not None:
        items = [it for c in (0, 1) for it in [i for i in items if i.label == c][:limit_per_class]]
    scores = []
    for chunk in _chunks(items, 32, show_progress, "evaluating"):
        scores.append(clf.predict([read_grayscale(it.path) for it in chunk])[:, PNEUMONIA])
    probs = np.concatenate(scores).astype(np.float64)
    labels = np.array([it.label for it in items], dtype=np.int64)
    report = classification_metrics(labels, probs, clf.threshold)

    def stat(idx: np.ndarray[Any, Any]) -> dict[str, Any]:
        return classification_metrics(labels[idx], probs[idx], clf.threshold)

    cal = calibration(labels, probs)
    units = data_mod.resampling_units(items)
    report["ci95"] = bootstrap_ci(
        stat, len(labels), CI_KEYS, n_boot=n_boot, seed=BOOTSTRAP_SEED, units=units
    )
    report["bootstrap"] = _bootstrap_info("patient", units, n_boot)
    report["calibration"] = {"brier": cal.brier, "ece": cal.ece, "reliability": cal.table}
    report["threshold"] = clf.threshold
    report["model"] = {"name": clf.name, "version": clf.version}
    report["split"] = split or "all"
    return report


def evaluate_segmenter_dir(
    data_dir: Path,
    weights_dir: Path | None = None,
    *,
    holdout_only: bool = False,
    n_boot: int = 2000,
    show_progress: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Mean Dice and IoU (per image, at the image's own resolution) with 95% bootstrap CIs."""
    seg = load_segmenter(weights_dir)
    items = data_mod.list_segmentation(data_dir)
    if holdout_only:
        held = set(seg.metadata.training_data.get("held_out", []))
        items = [it for it in items if it.image.name in held]
    items = items[:limit] if limit is not None else items
    dices, ious, names = [], [], []
    for chunk in _chunks(items, 4, show_progress, "evaluating"):
        masks = seg.predict([read_grayscale(it.image) for it in chunk])
        for it, pred in zip(chunk, masks, strict=True):
            truth = read_grayscale(it.mask) >= 128
            d, i = dice_iou(pred, truth)
            dices.append(d)
            ious.append(i)
            names.append(it.image.name)
    dice_arr, iou_arr = np.array(dices), np.array(ious)

    def stat(idx: np.ndarray[Any, Any]) -> dict[str, Any]:
        return {"dice": dice_arr[idx].mean(), "iou": iou_arr[idx].mean()}

    units = data_mod.segmentation_units(data_dir, items)
    return {
        "dice": float(dice_arr.mean()),
        "iou": float(iou_arr.mean()),
        "n": len(items),
        "ci95": bootstrap_ci(
            stat, len(items), ["dice", "iou"], n_boot=n_boot, seed=BOOTSTRAP_SEED, units=units
        ),
        "bootstrap": _bootstrap_info("case", units, n_boot),
        "per_image": {n: {"dice": d, "iou": i} for n, d, i in zip(names, dices, ious, strict=True)},
        "model": {"name": seg.name, "version": seg.version},
    }


def _bootstrap_info(unit: str, units: Sequence[int], n_boot: int) -> dict[str, Any]:
    """How the 95% CIs were made: percentile bootstrap, what was resampled, how often."""
    return {
        "method": "percentile",
        "unit": unit,
        "units": len(set(units)),
        "resamples": n_boot,
        "seed": BOOTSTRAP_SEED,
    }


def render(report: dict[str, Any]) -> None:
    """Print a report as a Rich table: metric, value, 95% CI."""
    table = Table(title=f"{report['model']['name']} {report['model']['version']} (n={report['n']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI (bootstrap)", justify="right")
    for key, (lo, hi) in report["ci95"].items():
        table.add_row(key, f"{report[key]:.4f}", f"{lo:.4f} - {hi:.4f}")
    if "threshold" in report:
        table.add_row("decision threshold", f"{report['threshold']:.4f}", "")
    if "confusion_matrix" in report:
        (tn, fp), (fn, tp) = report["confusion_matrix"]
        table.add_row("confusion [[TN FP] [FN TP]]", f"[[{tn} {fp}] [{fn} {tp}]]", "")
    if "calibration" in report:
        table.add_row("brier", f"{report['calibration']['brier']:.4f}", "")
        table.add_row("ece", f"{report['calibration']['ece']:.4f}", "")
    Console().print(table)
