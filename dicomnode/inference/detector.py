"""The opacity detector step: pre-process (radiographs to the detector's input),
predict (the detector's probability map), post-process (boxes inside the lungs).

Without a detector model the boxes come from the thresholded Grad-CAM heat map
(:func:`boxes_from_heatmap`); the result says which method made them.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from dicomnode.inference.geometry import Box, boxes_from_probability, resize_map
from dicomnode.inference.registry import ModelSpec


def detector_input(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Pre-process: grey ``uint8`` radiographs resized (area) to the detector's input,
    scaled by its ``scale``, grey repeated to its channels."""
    dh, dw = spec.input_size
    resized = [cv2.resize(p, (dw, dh), interpolation=cv2.INTER_AREA) for p in images]
    grey = np.stack(resized).astype(np.float32)[..., None] * spec.scale
    return np.repeat(grey, spec.channels, axis=-1)


def source_lungs(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """A lung mask (any resolution) resized (nearest) to a (rows, columns) source image."""
    return cv2.resize(
        mask.astype(np.uint8), (columns, rows), interpolation=cv2.INTER_NEAREST
    ).astype(bool)


def boxes_from_detector(probability: np.ndarray, lungs: np.ndarray, threshold: float) -> list[Box]:
    """Post-process: one detector map (at its input size) resized to the source image
    (``lungs``' shape), thresholded, one box per component inside the lungs."""
    rows, columns = lungs.shape
    prob = resize_map(np.asarray(probability), columns, rows)
    return boxes_from_probability(prob, threshold, lungs)


def boxes_from_heatmap(heat: np.ndarray, lungs: np.ndarray, threshold: float) -> list[Box]:
    """The fallback without a detector: the Grad-CAM heat map (in source pixels)
    thresholded inside the lungs."""
    return boxes_from_probability(heat, threshold, lungs)
