"""Training of the triage classifier and the lung U-Net, reproducible from a seed.

Only `train/` data is used for fitting and for every choice made during training (early
stopping, learning-rate drops, temperature, decision threshold); `val/` is for reporting.
The second stage, `adapt_classifier`, also learns from the `adapt` half of `val/` (the test
domain) and then reports on the other half only (`data.split_validation`).
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from models import data as data_mod
from models.architectures import build_classifier, build_from_metadata, build_unet
from models.evaluate import choose_threshold, fit_temperature
from models.losses import dice_bce_loss, dice_metric
from models.registry import (
    CLASSIFIER_NAME,
    SEGMENTER_NAME,
    ModelMetadata,
    load_weights,
    metadata_path,
    save_weights,
    write_model,
)

console = Console(stderr=True)


def configure_runtime(seed: int) -> None:
    """Seed Python, NumPy and TF and ask TF for deterministic kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class RichProgress(keras.callbacks.Callback):  # type: ignore[misc]
    """One Rich progress bar per epoch, and a summary line of the logged metrics."""

    def __init__(self, steps_per_epoch: int, epochs: int) -> None:
        super().__init__()
        self.steps = steps_per_epoch
        self.epochs = epochs
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[loss]}"),
            console=console,
        )
        self.task: Any = None

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            f"epoch {epoch + 1}/{self.epochs}", total=self.steps, loss=""
        )

    def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
        loss = (logs or {}).get("loss")
        self.progress.update(self.task, advance=1, loss=f"loss {loss:.4f}" if loss else "")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.progress.stop()
        self.progress.remove_task(self.task)
        summary = " ".join(
            f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()) if isinstance(v, float)
        )
        console.print(f"epoch {epoch + 1}: {summary}")


class TimeBudget(keras.callbacks.Callback):  # type: ignore[misc]
    """Stop after the epoch that crosses the wall-clock budget (shared CPUs need a bound)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.start = time.monotonic()
        self.exhausted = False

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        if time.monotonic() - self.start > self.seconds:
            self.exhausted = True
            self.model.stop_training = True


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """Keep the best weights on disk as training goes, so an interrupted run leaves a model."""

    def __init__(self, path: Path, monitor: str, mode: str) -> None:
        super().__init__()
        self.path, self.monitor, self.sign = path, monitor, (1.0 if mode == "min" else -1.0)
        self.best = math.inf

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and self.sign * value < self.best:
            self.best = self.sign * value
            save_weights(self.model, self.path)


@dataclass(frozen=True)
class TrainSettings:
    input_size: int
    epochs: int = 50
    batch_size: int = 32
    seed: int = 20240601
    time_budget_s: float = math.inf
    learning_rate: float = 1e-3
    patience: int = 5
    version: str = "1.0.0"


def _logits(model: Any, images: Any) -> np.ndarray:
    """Pre-softmax scores of a classifier over a batched dataset, in order."""
    logits_model = keras.Model(model.input, model.get_layer("logits").output)
    fn = tf.function(lambda x: logits_model(x, training=False))
    return np.concatenate([np.asarray(fn(x)) for x, _ in images], axis=0)


def train_classifier(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    *,
    backbone: str = "cxrnet",
    backbone_weights: Path | None = None,
    tune_fraction: float = 0.15,
) -> ModelMetadata:
    """Fit on a patient-level part of `data_dir` (NORMAL/, PNEUMONIA/), tune on the rest."""
    configure_runtime(settings.seed)
    items = data_mod.list_classification(data_dir)
    fit_items, tune_items = data_mod.split_by_patient(items, tune_fraction, settings.seed)
    fit_labels = [it.label for it in fit_items]
    weights = data_mod.class_weights(fit_labels)
    console.print(
        f"{len(items)} unique images; fit {len(fit_items)} / tune {len(tune_items)} "
        f"(patient-level); class weights {weights}"
    )
    size, bs = settings.input_size, settings.batch_size
    train_ds = data_mod.classification_dataset(
        fit_items, size, bs, training=True, seed=settings.seed
    )
    tune_ds = data_mod.classification_dataset(tune_items, size, bs, training=False)
    architecture: dict[str, Any] = {"backbone": backbone}
    model = build_classifier(size, backbone, backbone_weights=backbone_weights)
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    steps = math.ceil(len(fit_items) / bs)
    budget = TimeBudget(settings.time_budget_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=settings.patience, restore_best_weights=True
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2),
        Checkpoint(out_dir / "checkpoint.weights.npz", "val_loss", "min"),
        budget,
        RichProgress(steps, settings.epochs),
    ]
    history = model.fit(
        train_ds,
        epochs=settings.epochs,
        steps_per_epoch=steps,
        validation_data=tune_ds,
        class_weight=weights,
        callbacks=callbacks,
        verbose=0,
        shuffle=False,
    )
    val_losses = history.history["val_loss"]
    if budget.exhausted:
        # EarlyStopping only restores at a patience stop; do the same at a budget stop.
        load_weights(model, out_dir / "checkpoint.weights.npz")
    tune_logits = _logits(model, tune_ds)
    tune_labels = np.array([it.label for it in tune_items])
    temperature = fit_temperature(tune_logits, tune_labels)
    scaled = tune_logits / temperature
    tune_probs = np.exp(scaled - scaled.max(1, keepdims=True))
    tune_probs /= tune_probs.sum(1, keepdims=True)
    threshold = choose_threshold(tune_probs[:, 1], tune_labels)
    console.print(f"temperature {temperature:.3f}, threshold {threshold:.3f}")
    meta = ModelMetadata(
        name=CLASSIFIER_NAME,
        version=settings.version,
        task="classification",
        input_size=size,
        architecture=architecture,
        class_names=[c.lower() for c in data_mod.CLASS_NAMES],
        decision_threshold=threshold,
        temperature=temperature,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
        training_data=_summary(data_dir, fit_items, tune_items),
        training={
            "seed": settings.seed,
            "batch_size": bs,
            "optimizer": "adam",
            "learning_rate": settings.learning_rate,
            "epochs_run": len(val_losses),
            "max_epochs": settings.epochs,
            "best_epoch": int(np.argmin(val_losses)) + 1,
            "best_tune_loss": float(np.min(val_losses)),
            "early_stopping_patience": settings.patience,
            "time_budget_exhausted": budget.exhausted,
            "class_weights": {str(k): v for k, v in weights.items()},
            "backbone_weights": backbone_weights.name if backbone_weights else None,
            "augmentation": _augmentation(),
        },
    )
    return write_model(model, meta, out_dir)


@dataclass(frozen=True)
class AdaptSettings:
    """Stage 2: fine-tune shipped weights towards the test domain (`val/` adapt part)."""

    init_weights: Path
    oversample: int = 15
    steps_per_epoch: int = 50
    #: "a": fit on adapt-fit, select on adapt-select (1.1.0); "b": the roles swapped, for
    #: the second member of a cross-fitted ensemble (each adapt image is out-of-fold once).
    #: With `n_folds` = K >= 2: "0" ... "K-1", the fold of `data.adapt_kfold` selected on
    #: (all other adapt folds are fitted on).
    fold: str = "a"
    #: 0: the two fixed adapt parts (folds "a"/"b"); K >= 2: K patient-level folds over
    #: the whole adapt half (`data.adapt_kfold`).
    n_folds: int = 0


#: Stage-2 folds: (the adapt part fitted on, the adapt part that early stopping,
#: temperature and threshold are chosen on).
ADAPT_FOLDS: dict[str, tuple[str, str]] = {
    "a": ("adapt_fit", "adapt_select"),
    "b": ("adapt_select", "adapt_fit"),
}


def fold_names(fold: str, n_folds: int = 0) -> tuple[str, str]:
    """(name of the adapt data fitted on, name of the part selected on) for a stage-2 fold."""
    if n_folds:
        return f"adapt minus fold {fold} of {n_folds}", f"adapt fold {fold} of {n_folds}"
    return ADAPT_FOLDS[fold]


def adapt_roles(
    val: data_mod.ValidationSplit, fold: str, n_folds: int = 0
) -> tuple[list[data_mod.LabelledImage], list[data_mod.LabelledImage]]:
    """(fit part, select part) of the adapt half for a stage-2 fold.

    `n_folds` 0: the fixed parts (`ADAPT_FOLDS`, fold "a" or "b"); K >= 2: fold "k" of
    `data.adapt_kfold(val.adapt, K)` is selected on and the other K-1 folds are fitted on.
    The report part is never in either.
    """
    if n_folds:
        folds = data_mod.adapt_kfold(val.adapt, n_folds)
        if fold not in {str(k) for k in range(n_folds)}:
            raise ValueError(f"unknown adapt fold {fold!r} (expected 0..{n_folds - 1})")
        k = int(fold)
        fit = [it for j, part in enumerate(folds) if j != k for it in part]
        return fit, folds[k]
    if fold not in ADAPT_FOLDS:
        raise ValueError(f"unknown adapt fold {fold!r} (expected one of {sorted(ADAPT_FOLDS)})")
    parts = {"adapt_fit": val.adapt_fit, "adapt_select": val.adapt_select}
    fit_name, select_name = ADAPT_FOLDS[fold]
    return parts[fit_name], parts[select_name]


def _temperature_and_threshold(
    model: Any, items: Sequence[data_mod.LabelledImage], size: int, bs: int
) -> tuple[float, float]:
    """Temperature (min NLL), then Youden threshold on the calibrated P(pneumonia)."""
    ds = data_mod.classification_dataset(items, size, bs, training=False)
    logits = _logits(model, ds)
    labels = np.array([it.label for it in items])
    temperature = fit_temperature(logits, labels)
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return temperature, choose_threshold(probs[:, 1], labels)


def adapt_classifier(
    train_dir: Path,
    adapt_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    adapt: AdaptSettings,
    *,
    tune_fraction: float = 0.15,
) -> ModelMetadata:
    """Fine-tune a trained classifier on train fit ∪ val adapt-fit (oversampled).

    The train fit/tune split is the one stage 1 used (same seed), so tune images stay
    unseen. Early stopping, the temperature and the threshold are chosen on `adapt_select`
    (target domain, patient-level slice of the adapt half); the report half of `val/` is
    never read here except to record its file names.
    """
    configure_runtime(settings.seed)
    init_meta = ModelMetadata.read(metadata_path(adapt.init_weights, CLASSIFIER_NAME))
    model = build_from_metadata(init_meta.task, init_meta.input_size, init_meta.architecture)
    load_weights(model, adapt.init_weights / init_meta.weights_file, init_meta.weights_sha256)
    size, bs = init_meta.input_size, settings.batch_size

    items = data_mod.list_classification(train_dir)
    fit_items, tune_items = data_mod.split_by_patient(items, tune_fraction, settings.seed)
    val = data_mod.split_validation(data_mod.list_classification(adapt_dir, deduplicate=False))
    fit_part, select_part = adapt_roles(val, adapt.fold, adapt.n_folds)
    fit_name, select_name = fold_names(adapt.fold, adapt.n_folds)
    mixed = fit_items + fit_part * adapt.oversample
    weights = data_mod.class_weights([it.label for it in mixed])
    console.print(
        f"fold {adapt.fold}: train fit {len(fit_items)} + {fit_name} {len(fit_part)} "
        f"x{adapt.oversample}; select on {select_name} {len(select_part)}; "
        f"report {len(val.report)} (not used); class weights {weights}"
    )
    train_ds = data_mod.classification_dataset(mixed, size, bs, training=True, seed=settings.seed)
    select_ds = data_mod.classification_dataset(select_part, size, bs, training=False)
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )
    budget = TimeBudget(settings.time_budget_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "checkpoint.weights.npz"
    save_weights(model, checkpoint)  # epoch 0: the initial weights compete too
    start_loss = float(model.evaluate(select_ds, verbose=0)[0])
    console.print(f"select loss of the initial weights {start_loss:.4f}")
    best = Checkpoint(checkpoint, "val_loss", "min")
    best.best = start_loss
    history = model.fit(
        train_ds,
        epochs=settings.epochs,
        steps_per_epoch=adapt.steps_per_epoch,
        validation_data=select_ds,
        class_weight=weights,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience),
            best,
            budget,
            RichProgress(adapt.steps_per_epoch, settings.epochs),
        ],
        verbose=0,
        shuffle=False,
    )
    load_weights(model, checkpoint)
    select_losses = [start_loss] + [float(v) for v in history.history["val_loss"]]
    temperature, threshold = _temperature_and_threshold(model, select_part, size, bs)
    console.print(f"temperature {temperature:.3f}, threshold {threshold:.3f}")

    def names(part: Sequence[data_mod.LabelledImage]) -> list[str]:
        return [f"{data_mod.CLASS_NAMES[it.label]}/{it.path.name}" for it in part]

    training_data = _summary(train_dir, fit_items, tune_items)
    training_data["adapt"] = {
        "source": f"{adapt_dir.parent.name}/{adapt_dir.name}",
        "split": "by patient, per class (models.data.split_validation)",
        "seed": data_mod.VAL_SPLIT_SEED,
        "oversample": adapt.oversample,
        "fold": adapt.fold,
        "n_folds": adapt.n_folds,
        "fit_on": fit_name,
        "selected_on": select_name,
        **{
            part: {
                "counts": _counts(items_),
                "patients": len({it.patient for it in items_}),
                "files": names(items_),
            }
            for part, items_ in (
                ("adapt_fit", val.adapt_fit),
                ("adapt_select", val.adapt_select),
                ("report", val.report),
            )
        },
    }
    if adapt.n_folds:
        training_data["adapt"]["kfold"] = kfold_summary(val, adapt.n_folds)
    meta = ModelMetadata(
        name=CLASSIFIER_NAME,
        version=settings.version,
        task="classification",
        input_size=size,
        architecture=init_meta.architecture,
        class_names=init_meta.class_names,
        decision_threshold=threshold,
        temperature=temperature,
        weights_file="",
        weights_sha256="",
        weights_dtype="float32",
        training_data=training_data,
        training={
            "stage1": init_meta.training,
            "stage2": {
                "init_weights": f"{init_meta.name} {init_meta.version} "
                f"(sha256 {init_meta.weights_sha256})",
                "seed": settings.seed,
                "batch_size": bs,
                "optimizer": "adam",
                "learning_rate": settings.learning_rate,
                "steps_per_epoch": adapt.steps_per_epoch,
                "epochs_run": len(select_losses) - 1,
                "max_epochs": settings.epochs,
                "best_epoch": int(np.argmin(select_losses)),
                "select_losses": select_losses,
                "early_stopping_patience": settings.patience,
                "time_budget_exhausted": budget.exhausted,
                "class_weights": {str(k): v for k, v in weights.items()},
                "augmentation": _augmentation(),
                "fold": adapt.fold,
                "n_folds": adapt.n_folds,
                "fitted_on": f"train fit + {fit_name} x{adapt.oversample}",
                "chosen_on": f"{select_name} (early stopping, temperature, threshold)",
            },
        },
    )
    return write_model(model, meta, out_dir)


def kfold_summary(val: data_mod.ValidationSplit, n_folds: int) -> dict[str, Any]:
    """How the adapt half was cut into K folds, with each fold's file list (metadata)."""
    return {
        "split": "by patient, stratified by class (models.data.adapt_kfold)",
        "seed": data_mod.ADAPT_KFOLD_SEED,
        "n_folds": n_folds,
        "folds": [
            {
                "counts": _counts(part),
                "patients": len({it.patient for it in part}),
                "files": [f"{data_mod.CLASS_NAMES[it.label]}/{it.path.name}" for it in part],
            }
            for part in data_mod.adapt_kfold(val.adapt, n_folds)
        ],
    }


def _counts(items: Sequence[data_mod.LabelledImage]) -> dict[str, int]:
    return {c: sum(it.label == i for it in items) for i, c in enumerate(data_mod.CLASS_NAMES)}


def _augmentation() -> dict[str, Any]:
    return {
        "rotation_deg": data_mod.MAX_ROTATION_DEG,
        "zoom": list(data_mod.ZOOM_RANGE),
        "shift_fraction": data_mod.MAX_SHIFT_FRACTION,
        "horizontal_flip": True,
    }


def _summary(
    data_dir: Path,
    fit_items: Sequence[data_mod.LabelledImage],
    tune_items: Sequence[data_mod.LabelledImage],
) -> dict[str, Any]:
    def counts(items: Sequence[data_mod.LabelledImage]) -> dict[str, int]:
        return {c: sum(it.label == i for it in items) for i, c in enumerate(data_mod.CLASS_NAMES)}

    return {
        "source": f"{data_dir.parent.name}/{data_dir.name}",
        "deduplicated_by": "sha256",
        "split": "by patient",
        "fit": counts(fit_items),
        "tune": counts(tune_items),
        "fit_patients": len({it.patient for it in fit_items}),
        "tune_patients": len({it.patient for it in tune_items}),
    }


def train_segmenter(
    data_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    *,
    steps_per_epoch: int = 16,
    warmup_size: int | None = None,
    warmup_fraction: float = 0.7,
    init_weights: Path | None = None,
) -> ModelMetadata:
    """Fit the U-Net on every image of `data_dir` except the fixed hold-out.

    `init_weights` (a weights dir) continues an earlier run instead of starting from
    random weights: more epochs at the final size without repeating the warm-up.

    With 27 training images there is nothing to spare for early stopping: the run goes for
    a fixed number of epochs (or the time budget) with learning-rate drops on the training
    loss, and the final weights are kept. With `warmup_size`, the first `warmup_fraction`
    of the budget trains at that smaller size (4x cheaper at half the side; the network is
    fully convolutional, so the weights carry over) and the rest at `input_size`.
    """
    configure_runtime(settings.seed)
    items = data_mod.list_segmentation(data_dir)
    holdout = data_mod.lungs_holdout(items)
    fit_items = [it for it in items if it.image.name not in holdout]
    console.print(f"{len(fit_items)} training images, {len(holdout)} held out")
    size, bs = settings.input_size, settings.batch_size
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = [(size, settings.time_budget_s, settings.learning_rate)]
    if warmup_size:
        phases = [
            (warmup_size, settings.time_budget_s * warmup_fraction, settings.learning_rate),
            (size, settings.time_budget_s * (1 - warmup_fraction), settings.learning_rate / 3),
        ]
    weights: list[Any] | None = None
    init_note: str | None = None
    if init_weights is not None:
        init_meta = ModelMetadata.read(metadata_path(init_weights, SEGMENTER_NAME))
        start = build_unet(size)
        load_weights(start, init_weights / init_meta.weights_file, init_meta.weights_sha256)
        weights = start.get_weights()
        init_note = f"{init_meta.name} {init_meta.version} sha256 {init_meta.weights_sha256}"
    losses: list[float] = []
    exhausted = False
    for phase_size, seconds, lr in phases:
        console.print(f"phase: {phase_size}x{phase_size}, {seconds / 60:.0f} min, lr {lr}")
        train_ds = data_mod.segmentation_dataset(
            fit_items, phase_size, bs, training=True, seed=settings.seed
        )
        model = build_unet(phase_size)
        if weights is not None:
            model.set_weights(weights)
        model.compile(
            optimizer=keras.optimizers.Adam(lr), loss=dice_bce_loss, metrics=[dice_metric]
        )
        budget = TimeBudget(seconds)
        callbacks = [
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=4, min_lr=1e-5),
            Checkpoint(out_dir / f"checkpoint{phase_size}.weights.npz", "loss", "min"),
            budget,
            RichProgress(steps_per_epoch, settings.epochs),
        ]
        history = model.fit(
            train_ds,
            epochs=settings.epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            verbose=0,
            shuffle=False,
        )
        weights = model.get_weights()
        losses += [float(v) for v in history.history["loss"]]
        exhausted = exhausted or budget.exhausted
    fp16 = _float16_check(model, fit_items[:4], size)
    console.print(f"float16 storage check on 4 training images: {fp16}")
    meta = ModelMetadata(
        name=SEGMENTER_NAME,
        version=settings.version,
        task="segmentation",
        input_size=size,
        architecture={"base_filters": 64, "depth": 3},
        class_names=["lung"],
        decision_threshold=0.5,
        weights_file="",
        weights_sha256="",
        # float16 halves the 31 MB float32 file to fit the 20 MB limit; see the card.
        weights_dtype="float16",
        training_data={
            "source": data_dir.name,
            "fit_images": len(fit_items),
            "held_out": sorted(holdout),
            "split": "fixed: sorted index % 5 == 2 held out",
        },
        training={
            "seed": settings.seed,
            "batch_size": bs,
            "optimizer": "adam",
            "learning_rate": settings.learning_rate,
            "steps_per_epoch": steps_per_epoch,
            "epochs_run": len(losses),
            "phases": [
                {"input_size": p, "minutes": t / 60, "learning_rate": r} for p, t, r in phases
            ],
            "max_epochs": settings.epochs,
            "final_loss": losses[-1],
            "time_budget_exhausted": exhausted,
            "float16_check": fp16,
            "init_weights": init_note,
            "loss": "dice + bce",
            "augmentation": {**_augmentation(), "gamma": [0.8, 1.25], "brightness": 0.1},
        },
    )
    return write_model(model, meta, out_dir)


def _float16_check(
    model: Any, items: Sequence[data_mod.MaskedImage], size: int
) -> dict[str, float]:
    """How much float16 weight storage changes the output (max |dp| and mask agreement)."""
    x = np.concatenate(
        [x for x, _ in data_mod.segmentation_dataset(items, size, 4, training=False)]
    )
    p32 = np.asarray(model(x, training=False))
    twin = build_unet(size)
    twin.set_weights([w.astype(np.float16).astype(np.float32) for w in model.get_weights()])
    p16 = np.asarray(twin(x, training=False))
    return {
        "max_abs_prob_diff": float(np.abs(p32 - p16).max()),
        "mask_agreement": float(((p32 >= 0.5) == (p16 >= 0.5)).mean()),
    }
