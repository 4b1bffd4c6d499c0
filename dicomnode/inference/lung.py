"""The radiograph lung-mask step: pre-process, predict (the lung U-Net), post-process;
and the lung crop the classifiers see.

The pipeline (:mod:`dicomnode.pipelines.cxr`) and training (the lung recipe's evaluation,
:mod:`dicomnode.training.cxr_data`'s crops) call the same functions, so the classifiers
learn on the crops the node makes and the lung model is measured as it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from dicomnode.inference.geometry import Box, crop, lung_box
from dicomnode.inference.registry import ModelSpec

#: Probability at or above which a U-Net pixel is lung.
LUNG_THRESHOLD = 0.5


def keep_largest(mask: np.ndarray, count: int = 2, min_fraction: float = 0.005) -> np.ndarray:
    """The ``count`` largest connected components of ``mask`` (tiny specks dropped)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:count] + 1
    floor = min_fraction * mask.size
    keep = [label for label in order if stats[label, cv2.CC_STAT_AREA] >= floor]
    return np.isin(labels, keep)


def lung_mask_input(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Pre-process: grey ``uint8`` images resized (area) to the lung model's input and
    scaled by its manifest's ``scale``, ``(images, h, w, 1)`` float32."""
    mh, mw = spec.input_size
    resized = [cv2.resize(p, (mw, mh), interpolation=cv2.INTER_AREA) for p in images]
    return np.stack(resized).astype(np.float32)[..., None] * spec.scale


def lung_masks_from_probability(probability: np.ndarray) -> list[np.ndarray]:
    """Post-process: the U-Net's ``(images, h, w[, 1])`` output thresholded at
    :data:`LUNG_THRESHOLD` and reduced to its two largest components (the lungs)."""
    p = np.asarray(probability)
    if p.ndim == 4:
        p = p[..., 0]
    return [keep_largest(one >= LUNG_THRESHOLD) for one in p]


def lung_masks(
    images: Sequence[np.ndarray],
    spec: ModelSpec,
    predict: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """The lung masks of grey ``uint8`` images at the U-Net's resolution:
    :func:`lung_mask_input`, ``predict`` (the lung U-Net, batched),
    :func:`lung_masks_from_probability`."""
    return lung_masks_from_probability(np.asarray(predict(lung_mask_input(images, spec))))


def lung_crop(pixels: np.ndarray, mask: np.ndarray, size: int) -> tuple[Box, np.ndarray, bool]:
    """``(box, crop, lungs_found)`` of one grey ``uint8`` image.

    The box is the lungs' extent in ``mask`` relaxed by 5 % per side
    (:func:`~dicomnode.inference.geometry.lung_box`), mapped to the image's pixels; the
    crop is that box cut from ``pixels`` and resized to ``size`` x ``size``. Without lungs
    in the mask the box is the whole image (``lungs_found`` False).
    """
    mh, mw = mask.shape
    rows, columns = pixels.shape[:2]
    box = lung_box(mask)
    found = box is not None
    if box is None:
        box = Box(0, 0, mw, mh)  # no lung found: analyse the whole image
    source_box = box.scaled(columns / mw, rows / mh)
    return source_box, crop(pixels, source_box, size), found
