"""Datasets: file listing, deduplication, patient-level split, tf.data pipelines, augmentation.

A validation score is only trustworthy when no patient and no byte-identical image sits on
both sides of a split, so listing deduplicates by sha256 and splitting groups by patient.
"""

import csv
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from models.preprocess import normalize_images, resize_masks

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

#: Rotation (degrees), zoom range and horizontal flip used by `augment`.
MAX_ROTATION_DEG = 10.0
ZOOM_RANGE = (0.9, 1.1)
MAX_SHIFT_FRACTION = 0.05

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)


def patient_id(filename: str) -> str:
    """Patient id of a Kermany file name (`personNNN_...`, `IM-NNNN-...`, `NORMAL2-IM-NNNN-...`).

    Unknown names are their own patient, which is the conservative choice for a split.
    """
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1)
    return Path(filename).stem


@dataclass(frozen=True)
class LabelledImage:
    """One classification example: the file and its class index in `CLASS_NAMES`."""

    path: Path
    label: int

    @property
    def patient(self) -> str:
        return patient_id(self.path.name)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _foreign_hashes(data_dir: Path) -> set[str]:
    """sha256 of images in the other splits listed by a sibling manifest.csv, if any.

    Training on `train/` must not see an image byte-identical to one in `val/`.
    """
    manifest = data_dir.parent / "manifest.csv"
    if not manifest.is_file():
        return set()
    with manifest.open(newline="") as handle:
        return {row["sha256"] for row in csv.DictReader(handle) if row["split"] != data_dir.name}


def list_classification(data_dir: Path, deduplicate: bool = True) -> list[LabelledImage]:
    """Images under `data_dir/NORMAL` and `data_dir/PNEUMONIA`, sorted by class then name.

    With `deduplicate`, byte-identical copies are kept once (first in sorted order) and
    images identical to one in another split of the same manifest are dropped.
    """
    foreign = _foreign_hashes(data_dir) if deduplicate else set()
    seen: set[str] = set()
    items: list[LabelledImage] = []
    for label, class_name in enumerate(CLASS_NAMES):
        folder = data_dir / class_name
        if not folder.is_dir():
            raise FileNotFoundError(f"missing class folder {folder}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if deduplicate:
                digest = sha256_file(path)
                if digest in seen or digest in foreign:
                    continue
                seen.add(digest)
            items.append(LabelledImage(path, label))
    return items


def split_by_patient(
    items: Sequence[LabelledImage], tune_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split into (fit, tune) with whole patients on one side, per class, reproducibly."""
    rng = np.random.default_rng(seed)
    fit: list[LabelledImage] = []
    tune: list[LabelledImage] = []
    for label in range(len(CLASS_NAMES)):
        patients = sorted({it.patient for it in items if it.label == label})
        order = rng.permutation(len(patients))
        n_tune = math.ceil(tune_fraction * len(patients))
        tune_patients = {patients[i] for i in order[:n_tune]}
        for it in items:
            if it.label == label:
                (tune if it.patient in tune_patients else fit).append(it)
    return fit, tune


def resampling_units(items: Sequence[LabelledImage]) -> list[int]:
    """Bootstrap unit of each item: its patient, with byte-identical files joined into one.

    Images of one patient are correlated, so a confidence interval must resample patients,
    not images. A file byte-identical to one of another "patient" (`val/` has such a pair,
    NORMAL2-IM-0095 and -0096) is the same exposure, so the two patients form one unit.
    """
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    keys = []
    for it in items:
        a, b = find(f"patient:{it.patient}"), find(f"sha256:{sha256_file(it.path)}")
        if a != b:
            parent[b] = a
        keys.append(f"patient:{it.patient}")
    roots: dict[str, int] = {}
    return [roots.setdefault(find(k), len(roots)) for k in keys]


#: Seed of the `val/` adapt/report split; changing it changes which images a card reports on.
VAL_SPLIT_SEED = 20240715


@dataclass(frozen=True)
class ValidationSplit:
    """`val/` cut by patient into a target-domain part we may learn from and one we report on.

    `val/` is the developers' half of the source test set, i.e. the domain the model is
    judged in. Adapting to it is legitimate only if the numbers we publish come from images
    that took no part in training or in any choice: `report` is that part. `adapt_select`
    is a patient-level slice of `adapt` for early stopping, temperature and threshold, so
    that nothing is chosen on `report` either.
    """

    adapt_fit: list[LabelledImage]
    adapt_select: list[LabelledImage]
    report: list[LabelledImage]

    @property
    def adapt(self) -> list[LabelledImage]:
        return self.adapt_fit + self.adapt_select


def split_validation(
    items: Sequence[LabelledImage],
    *,
    report_fraction: float = 0.5,
    select_fraction: float = 0.4,
    seed: int = VAL_SPLIT_SEED,
) -> ValidationSplit:
    """Patient-level, per-class, seeded split of `val/` items (see `ValidationSplit`).

    Pass the listing of the whole `val/` folder *without* deduplication (as evaluation
    reads a folder) so that the training and evaluation commands see the same patients on
    each side; a subset of the folder would be split differently (the file lists are
    recorded in the model metadata).
    """
    adapt, report = split_by_patient(items, report_fraction, seed)
    adapt_fit, adapt_select = split_by_patient(adapt, select_fraction, seed + 1)
    return ValidationSplit(adapt_fit, adapt_select, report)


#: Seed of the patient-level K-fold split of the adapt half (`adapt_kfold`).
ADAPT_KFOLD_SEED = VAL_SPLIT_SEED + 2


def adapt_kfold(
    adapt: Sequence[LabelledImage], n_folds: int, seed: int = ADAPT_KFOLD_SEED
) -> list[list[LabelledImage]]:
    """Cut the adapt half of `val/` into `n_folds` patient-level folds, stratified by class.

    Each patient is given one class (pneumonia if any of its images is); the patients of each
    class are shuffled (seeded) and each goes to the fold that has the fewest images of that
    class so far (ties: the lower fold), so every patient lands in exactly one fold and each
    fold gets about 1/n of each class's images. Pass `split_validation(...).adapt` only:
    the report part must never enter a fold.
    """
    if n_folds < 2:
        raise ValueError("need at least 2 folds")
    rng = np.random.default_rng(seed)
    patient_label: dict[str, int] = {}
    n_images: dict[str, int] = {}
    for it in adapt:
        patient_label[it.patient] = max(patient_label.get(it.patient, 0), it.label)
        n_images[it.patient] = n_images.get(it.patient, 0) + 1
    fold_of: dict[str, int] = {}
    for label in range(len(CLASS_NAMES)):
        patients = sorted(p for p, lab in patient_label.items() if lab == label)
        filled = [0] * n_folds
        for i in rng.permutation(len(patients)):
            k = filled.index(min(filled))
            fold_of[patients[i]] = k
            filled[k] += n_images[patients[i]]
    folds: list[list[LabelledImage]] = [[] for _ in range(n_folds)]
    for it in adapt:
        folds[fold_of[it.patient]].append(it)
    return folds


def class_weights(labels: Sequence[int]) -> dict[int, float]:
    """Inverse-frequency weights (mean 1): train is 26% NORMAL, so NORMAL errors count more."""
    counts = np.bincount(np.asarray(labels), minlength=len(CLASS_NAMES))
    total = float(counts.sum())
    return {i: total / (len(counts) * float(c)) for i, c in enumerate(counts) if c > 0}


@dataclass(frozen=True)
class MaskedImage:
    """One segmentation example: image file and its binary lung mask file."""

    image: Path
    mask: Path


def list_segmentation(data_dir: Path) -> list[MaskedImage]:
    """Pairs `data_dir/images/X` with `data_dir/masks/X`, sorted by name."""
    pairs = []
    for image in sorted((data_dir / "images").iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = data_dir / "masks" / image.name
        if not mask.is_file():
            raise FileNotFoundError(f"no mask for {image.name}")
        pairs.append(MaskedImage(image, mask))
    return pairs


def segmentation_units(data_dir: Path, items: Sequence[MaskedImage]) -> list[int]:
    """Bootstrap unit of each image: its source case (`source_url_or_id` in manifest.csv).

    Several images of the lung set are one patient (e.g. admission and day 3 of one
    Radiopaedia case); without a manifest row an image is its own unit.
    """
    manifest = data_dir / "manifest.csv"
    source: dict[str, str] = {}
    if manifest.is_file():
        with manifest.open(newline="") as handle:
            source = {row["file"]: row["source_url_or_id"] for row in csv.DictReader(handle)}
    cases: dict[str, int] = {}
    return [
        cases.setdefault(source.get(it.image.name, f"image:{it.image.name}"), len(cases))
        for it in items
    ]


def lungs_holdout(items: Sequence[MaskedImage], every: int = 5, offset: int = 2) -> set[str]:
    """Names of the fixed lung hold-out (sorted index % every == offset), never trained on."""
    return {it.image.name for i, it in enumerate(items) if i % every == offset}


# ---------------------------------------------------------------------------- tf.data


def decode_grayscale(path: Any) -> Any:
    """Read a JPEG/PNG as float32 (H, W, 1) in its own pixel units (luma for RGB files)."""
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=1, expand_animations=False)
    return tf.cast(image, tf.float32)


def random_affine(image: Any, seed: Any, fill: float = 0.0) -> Any:
    """Random rotation, zoom, shift and horizontal flip of an (S, S, C) tensor.

    All channels get the same transform, so image and mask stacked on the channel axis stay
    aligned. Stateless ops keyed by `seed` (shape (2,)) make runs reproducible.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    size = tf.cast(tf.shape(image)[0], tf.float32)
    angle = tf.random.stateless_uniform((), seeds[0], -MAX_ROTATION_DEG, MAX_ROTATION_DEG) * (
        math.pi / 180.0
    )
    zoom = tf.random.stateless_uniform((), seeds[1], ZOOM_RANGE[0], ZOOM_RANGE[1])
    shift = (
        tf.random.stateless_uniform((2,), seeds[2], -MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION) * size
    )
    flip = tf.random.stateless_uniform((), seeds[3]) < 0.5
    # Output pixel (x, y) samples input at c + R(-angle) (p - c) / zoom - shift.
    c = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    a0, a1 = cos, sin
    b0, b1 = -sin, cos
    a2 = c - a0 * c - a1 * c - shift[0]
    b2 = c - b0 * c - b1 * c - shift[1]
    # Flip: x_out' = (size - 1) - x_out, folded into the x coefficients.
    a2 = tf.where(flip, a2 + a0 * (size - 1.0), a2)
    b2 = tf.where(flip, b2 + b0 * (size - 1.0), b2)
    a0 = tf.where(flip, -a0, a0)
    b0 = tf.where(flip, -b0, b0)
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=fill,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def classification_dataset(
    items: Sequence[LabelledImage],
    size: int,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
) -> Any:
    """Batches of (images (B, S, S, 1) in [0, 1], one-hot labels (B, 2)).

    Decoding and normalisation are cached once; with `training` the stream is shuffled,
    repeated without end (use steps_per_epoch) and augmented with fresh randomness each
    epoch.
    """
    paths = [str(it.path) for it in items]
    labels = tf.one_hot([it.label for it in items], len(CLASS_NAMES))
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(
        lambda p, y: (normalize_images(decode_grayscale(p), size), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (random_affine(xy[0], s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def segmentation_dataset(
    items: Sequence[MaskedImage],
    size: int,
    batch_size: int,
    *,
    training: bool,
    seed: int = 0,
) -> Any:
    """Batches of (images (B, S, S, 1) in [0, 1], masks (B, S, S, 1) in {0, 1})."""
    ds = tf.data.Dataset.from_tensor_slices(
        ([str(it.image) for it in items], [str(it.mask) for it in items])
    )
    ds = ds.map(
        lambda i, m: (
            normalize_images(decode_grayscale(i), size),
            resize_masks(decode_grayscale(m), size),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if training:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True).repeat()
        seeds = tf.data.Dataset.random(seed=seed).batch(2)

        def _augment(xm: Any, s: Any) -> Any:
            stacked = random_affine(tf.concat([xm[0], xm[1]], axis=-1), s)
            image = stacked[..., :1]
            # Contrast/brightness jitter: adult portable films vary far more than the masks do.
            g = tf.random.stateless_uniform((2,), s + 7, [0.8, -0.1], [1.25, 0.1])
            image = tf.clip_by_value(tf.pow(image, g[0]) + g[1], 0.0, 1.0)
            return image, tf.cast(stacked[..., 1:] >= 0.5, tf.float32)

        ds = tf.data.Dataset.zip((ds, seeds)).map(
            _augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
