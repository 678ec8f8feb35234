"""Cross-fitted ensemble of stage-2 classifiers (pneumonia-triage 1.2.0 and later).

Two stage-2 members start from the same stage-1 weights with the roles of the two adapt
parts of `val/` swapped (`models.train.ADAPT_FOLDS`): member A fits adapt-fit and selects on
adapt-select, member B the other way round. Or, with K-fold members
(`--adapt-folds K`, `models.data.adapt_kfold`), member k fits all adapt folds but fold k and
selects on fold k. Either way every adapt image is out-of-fold for exactly one member, and
the ensemble's decision threshold is chosen on those out-of-fold (OOF) predictions over all
adapt images, never on the report part.

The OOF score of an image is the calibrated P(pneumonia) of the member that did not train
on it, not the ensemble's score (the ensemble has always trained on it). Using it as a
stand-in for the ensemble's score on new images is the usual cross-fitting approximation;
the member also chose its early-stopping epoch and temperature on those images, so the OOF
scores are slightly optimistic.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models import data as data_mod
from models.evaluate import calibration, choose_threshold, classification_metrics

#: How the members are combined (recorded in the metadata).
COMBINATION = "mean of the members' temperature-scaled logits, then softmax"


@dataclass(frozen=True)
class OutOfFold:
    """Per adapt image: which member scored it, its label and calibrated P(pneumonia)."""

    files: list[str]
    member: list[int]
    labels: NDArray[np.int64]
    scores: NDArray[np.float64]


def oof_threshold(
    member_scores: Sequence[NDArray[np.float64]], member_labels: Sequence[NDArray[np.int64]]
) -> tuple[float, dict[str, Any]]:
    """Youden threshold on the pooled out-of-fold scores, and the OOF metrics at it.

    `member_scores[i]` are member i's calibrated P(pneumonia) on the images it did not fit
    (its select part), `member_labels[i]` their labels. The parts are disjoint.
    """
    if len(member_scores) != len(member_labels) or not member_scores:
        raise ValueError("one score array and one label array per member")
    scores = np.concatenate([np.asarray(s, dtype=np.float64) for s in member_scores])
    labels = np.concatenate([np.asarray(y, dtype=np.int64) for y in member_labels])
    if scores.shape != labels.shape:
        raise ValueError("scores and labels differ in length")
    threshold = choose_threshold(scores, labels)
    metrics = classification_metrics(labels, scores, threshold)
    cal = calibration(labels, scores)
    metrics["brier"], metrics["ece"] = cal.brier, cal.ece
    metrics["nll"] = float(
        -np.mean(
            labels * np.log(np.clip(scores, 1e-7, 1))
            + (1 - labels) * np.log(np.clip(1 - scores, 1e-7, 1))
        )
    )
    return threshold, metrics


def member_select_parts(
    adapt_dir: Path, folds: Sequence[str], n_folds: int = 0
) -> list[list[data_mod.LabelledImage]]:
    """For each member's fold, the adapt part it selected on (= its out-of-fold images)."""
    from models.train import adapt_roles

    val = data_mod.split_validation(data_mod.list_classification(adapt_dir, deduplicate=False))
    return [adapt_roles(val, fold, n_folds)[1] for fold in folds]


def image_name(item: data_mod.LabelledImage) -> str:
    return f"{data_mod.CLASS_NAMES[item.label]}/{item.path.name}"


def _log_odds(p: NDArray[np.float64]) -> NDArray[np.float64]:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.asarray(np.log(p) - np.log1p(-p))


def _member_scores(
    member_dir: Path, items: Sequence[data_mod.LabelledImage], flip: bool
) -> NDArray[np.float64]:
    """A member's calibrated P(pneumonia) through the inference API (as workers run it).

    With `flip`, the horizontal-flip variant: the mean of the calibrated logits of the image
    and its mirror image (for two classes: the mean log-odds), as a sigmoid.
    """
    from models.inference import PNEUMONIA, load_classifier
    from models.report import read_grayscale

    clf = load_classifier(member_dir)
    images = [read_grayscale(it.path) for it in items]
    p = clf.predict(images)[:, PNEUMONIA].astype(np.float64)
    if not flip:
        return p
    q = clf.predict([im[:, ::-1].copy() for im in images])[:, PNEUMONIA].astype(np.float64)
    z = (_log_odds(p) + _log_odds(q)) / 2.0
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def assemble(
    member_dirs: Sequence[Path],
    adapt_dir: Path,
    out_dir: Path,
    version: str,
    *,
    hflip_tta: bool | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build the ensemble from trained stage-2 members; threshold on out-of-fold scores.

    `hflip_tta` None: decide flip TTA by the OOF rule (as 1.2.0 did); True/False: fixed
    (both variants are still reported). The members must cover every adapt image once:
    folds "a" and "b", or folds 0..K-1 of the same K-fold split.

    Returns (metadata written to `out_dir`, the OOF report incl. the flip-TTA comparison).
    """
    from models.architectures import build_ensemble, member_views
    from models.registry import (
        CLASSIFIER_NAME,
        ModelMetadata,
        load_weights,
        metadata_path,
        write_model,
    )
    from models.train import ADAPT_FOLDS, fold_names

    metas = [ModelMetadata.read(metadata_path(d, CLASSIFIER_NAME)) for d in member_dirs]
    archs = [{k: v for k, v in m.architecture.items() if k != "backbone_weights"} for m in metas]
    if any(a != archs[0] for a in archs) or len({m.input_size for m in metas}) != 1:
        raise ValueError("members differ in architecture or input size")
    if any(a.get("ensemble") for a in archs):
        raise ValueError("members must be single networks")
    folds = [str(m.training_data.get("adapt", {}).get("fold", "a")) for m in metas]
    n_folds_seen = {int(m.training_data.get("adapt", {}).get("n_folds", 0)) for m in metas}
    if len(n_folds_seen) != 1:
        raise ValueError("members come from different fold schemes")
    n_folds = n_folds_seen.pop()
    expected = [str(k) for k in range(n_folds)] if n_folds else sorted(ADAPT_FOLDS)
    if sorted(folds) != expected:
        raise ValueError(f"members must cover the adapt folds {expected} once each, got {folds}")
    temperatures = [float(m.temperature) for m in metas]
    size = metas[0].input_size
    member_arch: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in archs[0].items() if k != "backbone"
    }
    backbone = str(archs[0].get("backbone", "cxrnet"))
    model = build_ensemble(size, temperatures, backbone, **member_arch)
    for view, meta, folder in zip(member_views(model), metas, member_dirs, strict=True):
        load_weights(view, folder / meta.weights_file, meta.weights_sha256)

    parts = member_select_parts(adapt_dir, folds, n_folds)
    labels = [np.array([it.label for it in part], dtype=np.int64) for part in parts]
    variants: dict[str, dict[str, Any]] = {}
    for name, flip in (("plain", False), ("hflip_tta", True)):
        scores = [_member_scores(d, part, flip) for d, part in zip(member_dirs, parts, strict=True)]
        threshold, metrics = oof_threshold(scores, labels)
        variants[name] = {"threshold": threshold, "metrics": metrics}
    # Rule fixed before looking: flip TTA only if it lowers both the OOF log-loss and the
    # OOF error count at its own threshold; then the ensemble gets the mirrored branch
    # (`build_ensemble(hflip_tta=True)`) and that variant's threshold.
    plain, tta = variants["plain"], variants["hflip_tta"]

    def errors(v: dict[str, Any]) -> int:
        (_, fp), (fn, _) = v["metrics"]["confusion_matrix"]
        return int(fp + fn)

    tta_helps = tta["metrics"]["nll"] < plain["metrics"]["nll"] and errors(tta) < errors(plain)
    use_tta = tta_helps if hflip_tta is None else hflip_tta
    chosen = tta if use_tta else plain
    if use_tta:
        model = build_ensemble(size, temperatures, backbone, hflip_tta=True, **member_arch)
        for view, meta_, folder in zip(member_views(model), metas, member_dirs, strict=True):
            load_weights(view, folder / meta_.weights_file, meta_.weights_sha256)
    oof = {
        "chosen_on": "out-of-fold adapt predictions: each adapt image scored by the member "
        "that did not fit it (cross-fitting approximation, see models/ensemble.py)",
        "n": int(sum(len(p) for p in parts)),
        "members_oof_parts": [
            {"fold": f, "part": fold_names(f, n_folds)[1], "n": len(p)}
            for f, p in zip(folds, parts, strict=True)
        ],
        "variants": variants,
        "hflip_tta_rule": "adopt only if OOF log-loss and OOF errors both go down"
        if hflip_tta is None
        else f"fixed in advance: {'on' if hflip_tta else 'off'}",
        "hflip_tta_helps_on_oof": bool(tta_helps),
        "hflip_tta_adopted": bool(use_tta),
    }
    training_data = dict(metas[0].training_data)
    adapt_info = dict(training_data.get("adapt", {}))
    for key in ("fold", "fit_on", "selected_on", "oversample", "n_folds"):
        adapt_info.pop(key, None)
    adapt_info["members"] = [
        {k: m.training_data.get("adapt", {}).get(k) for k in ("fold", "oversample")} for m in metas
    ]
    adapt_info["members"][0]["fold"] = folds[0]
    if n_folds:
        adapt_info["n_folds"] = n_folds
    training_data["adapt"] = adapt_info
    meta = ModelMetadata(
        name=CLASSIFIER_NAME,
        version=version,
        task="classification",
        input_size=size,
        architecture={
            **archs[0],
            "ensemble": len(metas),
            "member_temperatures": temperatures,
            "hflip_tta": bool(use_tta),
        },
        class_names=metas[0].class_names,
        decision_threshold=chosen["threshold"],
        temperature=1.0,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
        training_data=training_data,
        training={
            "stage1": metas[0].training.get("stage1"),
            "members": [
                {
                    "version": m.version,
                    "fold": f,
                    "weights_sha256": m.weights_sha256,
                    "temperature": m.temperature,
                    "threshold_alone": m.decision_threshold,
                    "stage2": m.training.get("stage2"),
                }
                for m, f in zip(metas, folds, strict=True)
            ],
            "ensemble": {
                "combination": COMBINATION
                + (", over the image and its mirror image" if use_tta else ""),
                "threshold": oof,
            },
        },
    )
    return write_model(model, meta, out_dir), oof
