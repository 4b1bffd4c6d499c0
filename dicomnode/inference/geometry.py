"""Pure array geometry of the pipelines: lung box and crop, boxes, heat maps in source pixels.

No model and no DICOM here: numpy and OpenCV on arrays, so each step can be checked
numerically. Coordinates are pixels, ``x`` along columns and ``y`` along rows, boxes
as (x, y, width, height) with the end exclusive, like the seed's CSV files.
"""

from __future__ import annotations

import cv2
import numpy as np

from dicomnode.inference.box import Box

#: The seed's crop relaxes the lung extent by 5 % on every side.
LUNG_MARGIN = 0.05


def lung_box(mask: np.ndarray, margin: float = LUNG_MARGIN) -> Box | None:
    """The box around every lung pixel of ``mask``, relaxed by ``margin`` and clipped.

    The relaxation is ``int(margin * extent)`` pixels on each side, per axis, as in
    the seed; ``None`` when the mask is empty.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    pad_y = int((bottom - top) * margin)
    pad_x = int((right - left) * margin)
    height, width = mask.shape[:2]
    x0, y0 = max(0, left - pad_x), max(0, top - pad_y)
    x1, y1 = min(width, right + pad_x), min(height, bottom + pad_y)
    return Box(x0, y0, x1 - x0, y1 - y0)


def crop(image: np.ndarray, box: Box, size: int | tuple[int, int]) -> np.ndarray:
    """``image`` cut to ``box`` (whole pixels) and resized with ``cv2.INTER_AREA`` to
    ``size`` x ``size``, or to ``size`` = (height, width)."""
    x0, y0 = round(box.x), round(box.y)
    x1, y1 = round(box.x + box.width), round(box.y + box.height)
    part = image[y0:y1, x0:x1]
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(part, (width, height), interpolation=cv2.INTER_AREA)


def map_in_source(values: np.ndarray, box: Box, rows: int, columns: int) -> np.ndarray:
    """``values`` (a map over the crop ``box``) placed in a (rows, columns) float32 image,
    resized to the box and zero outside it."""
    full = np.zeros((rows, columns), np.float32)
    x0, y0 = round(box.x), round(box.y)
    x1, y1 = round(box.x + box.width), round(box.y + box.height)
    full[y0:y1, x0:x1] = resize_map(values, x1 - x0, y1 - y0)
    return full


def resize_map(values: np.ndarray, width: int, height: int) -> np.ndarray:
    """A probability or heat map resized to ``width`` x ``height`` (bilinear, float32)."""
    return cv2.resize(values.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def boxes_from_probability(
    probability: np.ndarray, threshold: float = 0.5, inside: np.ndarray | None = None
) -> list[Box]:
    """One box per connected component of ``probability >= threshold``.

    ``inside`` (a boolean mask of the same shape, e.g. the lungs) restricts the
    components to its pixels. Each box's confidence is the mean probability inside
    the box, as in seeds 002/003. Boxes come sorted by confidence, highest first.
    """
    binary = probability >= threshold
    if inside is not None:
        binary &= inside.astype(bool)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    boxes = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        confidence = float(probability[y : y + h, x : x + w].mean())
        boxes.append(Box(x, y, w, h, confidence))
    return sorted(boxes, key=lambda b: -(b.confidence or 0.0))


def normalize_heatmap(cam: np.ndarray) -> np.ndarray:
    """ReLU then scale to [0, 1] (all zeros stay zeros), as the seed's Grad-CAM does."""
    cam = np.maximum(cam.astype(np.float32), 0.0)
    peak = float(cam.max())
    return cam / peak if peak > 0 else cam


# --------------------------------------------------------------------------- ensembles
