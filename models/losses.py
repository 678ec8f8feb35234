"""Segmentation loss and overlap metric (Keras ops, usable in fit and in graphs)."""

from typing import Any

import keras
from keras import ops

SMOOTH = 1.0


def soft_dice(y_true: Any, y_pred: Any) -> Any:
    """Per-image soft Dice, averaged over the batch."""
    axes = (1, 2, 3)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return ops.mean((2.0 * inter + SMOOTH) / (total + SMOOTH))


def dice_bce_loss(y_true: Any, y_pred: Any) -> Any:
    """(1 - Dice) + BCE: Dice targets the overlap we report, BCE keeps early gradients sane."""
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
    return 1.0 - soft_dice(y_true, y_pred) + bce


def dice_metric(y_true: Any, y_pred: Any) -> Any:
    """Hard Dice at threshold 0.5, the number the model card reports."""
    return soft_dice(y_true, ops.cast(y_pred >= 0.5, "float32"))
