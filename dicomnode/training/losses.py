"""Segmentation losses of the training targets, registered for ``.keras`` (de)serialisation.

Registered under the ``dicomnode`` package so that a checkpoint saved with one of them
loads again for resuming without ``custom_objects``. Keras 3 ``keras.ops`` only.
Importing this module imports Keras.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

_SMOOTH = 1.0


def _flat(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    y_true = ops.cast(y_true, y_pred.dtype)
    batch = ops.shape(y_pred)[0]
    return ops.reshape(y_true, (batch, -1)), ops.reshape(y_pred, (batch, -1))


@keras.saving.register_keras_serializable(package="dicomnode")
def soft_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """1 - soft Dice per image (smoothing 1), a vector over the batch."""
    t, p = _flat(y_true, y_pred)
    inter = ops.sum(t * p, axis=1)
    return 1.0 - (2.0 * inter + _SMOOTH) / (ops.sum(t, axis=1) + ops.sum(p, axis=1) + _SMOOTH)


@keras.saving.register_keras_serializable(package="dicomnode")
def soft_iou_loss(y_true: Any, y_pred: Any) -> Any:
    """1 - soft IoU (Jaccard) per image (smoothing 1), as in seeds 002/003."""
    t, p = _flat(y_true, y_pred)
    inter = ops.sum(t * p, axis=1)
    union = ops.sum(t, axis=1) + ops.sum(p, axis=1) - inter
    return 1.0 - (inter + _SMOOTH) / (union + _SMOOTH)


def _bce(y_true: Any, y_pred: Any) -> Any:
    t, p = _flat(y_true, y_pred)
    return ops.mean(keras.losses.binary_crossentropy(t[..., None], p[..., None]), axis=1)


@keras.saving.register_keras_serializable(package="dicomnode")
def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    """Binary cross-entropy + soft Dice loss (lung U-Net)."""
    return _bce(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="dicomnode")
def bce_iou_loss(y_true: Any, y_pred: Any) -> Any:
    """0.5 * binary cross-entropy + 0.5 * IoU loss (the seeds' opacity detector loss)."""
    return 0.5 * _bce(y_true, y_pred) + 0.5 * soft_iou_loss(y_true, y_pred)


__all__ = ["bce_dice_loss", "bce_iou_loss", "soft_dice_loss", "soft_iou_loss"]
