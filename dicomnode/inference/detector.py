"""The opacity detector step: pre-process (radiographs to the detector's input),
predict (the detector's probability map), post-process (boxes inside the lungs).

Post-processing (seeds 002/003, with the authors' advice): the detector's map resized
to the source image, its image-level score (mean of the ``top_k`` highest map values)
as the classifier gate (no boxes below ``gate``), the map thresholded and kept inside
the lungs (the lung mask widened by ``lung_margin`` of the image width, since a lung
U-Net tends to leave dense consolidation out), one box per connected component with
confidence = mean probability in the box, boxes smaller than ``min_area`` (a share of
the image) dropped, overlapping boxes merged into their union, at most ``max_boxes`` by
confidence.

Without a detector model the boxes come from the thresholded Grad-CAM heat map
(:func:`boxes_from_heatmap`); the result says which method made them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import cv2
import numpy as np

from dicomnode.inference.geometry import Box, boxes_from_probability, resize_map
from dicomnode.inference.registry import ModelSpec


@dataclass(frozen=True)
class BoxSettings:
    """The post-processing of a detector map; a manifest's ``[postprocess]`` table."""

    threshold: float = 0.5
    gate: float = 0.5
    top_k: int = 8
    min_area: float = 0.005
    max_boxes: int = 3
    lung_margin: float = 0.05

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> BoxSettings:
        """Settings from a ``[postprocess]`` table; unknown keys are an error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ValueError(f"[postprocess] has unknown keys {unknown}; known: {sorted(known)}")
        values = {
            k: (int(v) if k in ("top_k", "max_boxes") else float(v)) for k, v in table.items()
        }
        return cls(**values)  # type: ignore[arg-type]

    def as_table(self) -> dict[str, float | int]:
        """The ``[postprocess]`` table of these settings."""
        return asdict(self)

    def with_(self, **changes: Any) -> BoxSettings:
        """A copy with ``changes``."""
        return replace(self, **changes)


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


def image_score(probability: np.ndarray, top_k: int = 8) -> float:
    """The image-level opacity score of a detector map: the mean of its ``top_k``
    highest values (what the detector's image-level loss trains)."""
    flat = np.asarray(probability, np.float32).ravel()
    k = max(1, min(top_k, flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def widen(lungs: np.ndarray, margin: float) -> np.ndarray:
    """The lung mask dilated by ``margin`` of its width (a square kernel)."""
    radius = round(margin * lungs.shape[1])
    if radius <= 0:
        return lungs.astype(bool)
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(lungs.astype(np.uint8), kernel).astype(bool)


def _union(a: Box, b: Box) -> Box:
    x0, y0 = min(a.x, b.x), min(a.y, b.y)
    x1, y1 = max(a.x + a.width, b.x + b.width), max(a.y + a.height, b.y + b.height)
    return Box(x0, y0, x1 - x0, y1 - y0)


def _overlap(a: Box, b: Box) -> bool:
    return min(a.x + a.width, b.x + b.width) > max(a.x, b.x) and min(
        a.y + a.height, b.y + b.height
    ) > max(a.y, b.y)


def _confidence(probability: np.ndarray, box: Box) -> float:
    x0, y0 = int(box.x), int(box.y)
    x1, y1 = int(np.ceil(box.x + box.width)), int(np.ceil(box.y + box.height))
    return float(probability[y0:y1, x0:x1].mean())


def merge_overlapping(boxes: Sequence[Box], probability: np.ndarray) -> list[Box]:
    """Overlapping boxes replaced by their union (repeatedly, until none overlap), the
    union's confidence the mean probability inside it; sorted by confidence."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                if _overlap(merged[i], merged[j]):
                    union = _union(merged[i], merged[j])
                    union = Box(
                        union.x, union.y, union.width, union.height, _confidence(probability, union)
                    )
                    merged = [b for k, b in enumerate(merged) if k not in (i, j)] + [union]
                    changed = True
                    break
            if changed:
                break
    return sorted(merged, key=lambda b: -(b.confidence or 0.0))


def boxes_in_lungs(
    probability: np.ndarray, lungs: np.ndarray, settings: BoxSettings, gated: bool = True
) -> list[Box]:
    """Post-process a detector map already at the source size (``lungs``' shape): the
    steps of this module's docstring; ``gated`` False skips the image-level gate (FROC)."""
    if gated and image_score(probability, settings.top_k) < settings.gate:
        return []
    rows, columns = probability.shape
    binary = (probability >= settings.threshold) & widen(lungs, settings.lung_margin)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    floor = settings.min_area * rows * columns
    boxes = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        if w * h < floor:
            continue
        boxes.append(Box(x, y, w, h, _confidence(probability, Box(x, y, w, h))))
    return merge_overlapping(boxes, probability)[: settings.max_boxes]


def boxes_from_detector(
    probability: np.ndarray, lungs: np.ndarray, settings: BoxSettings
) -> list[Box]:
    """Post-process: one detector map (at its output size) resized to the source image
    (``lungs``' shape), then :func:`boxes_in_lungs`."""
    rows, columns = lungs.shape
    prob = resize_map(np.asarray(probability), columns, rows)
    return boxes_in_lungs(prob, lungs, settings)


def boxes_from_heatmap(heat: np.ndarray, lungs: np.ndarray, threshold: float) -> list[Box]:
    """The fallback without a detector: the Grad-CAM heat map (in source pixels)
    thresholded inside the lungs."""
    return boxes_from_probability(heat, threshold, lungs)
