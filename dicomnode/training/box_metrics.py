"""Box detection metrics: the RSNA Pneumonia Detection challenge score, box sensitivity,
false boxes per negative image, FROC, with bootstrap intervals over images.

Boxes are (x, y, width, height) in pixels; predictions carry a confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The challenge's IoU thresholds: 0.40, 0.45, ..., 0.75.
RSNA_THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))

BoxT = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageBoxes:
    """The true boxes of one image and the predicted (box, confidence) pairs."""

    truth: Sequence[BoxT]
    predicted: Sequence[tuple[BoxT, float]]


def box_iou(a: BoxT, b: BoxT) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def rsna_image_score(image: ImageBoxes) -> float | None:
    """One image's challenge score: the mean over :data:`RSNA_THRESHOLDS` of
    TP / (TP + FP + FN), predictions matched greedily by confidence to the unmatched true
    box of highest IoU (a match needs IoU above the threshold). ``None`` for an image with
    neither truth nor prediction (the challenge skips it)."""
    if not image.truth and not image.predicted:
        return None
    order = sorted(image.predicted, key=lambda p: -p[1])
    scores = []
    for t in RSNA_THRESHOLDS:
        free = list(image.truth)
        tp = 0
        for box, _ in order:
            if not free:
                break
            ious = [box_iou(box, g) for g in free]
            best = int(np.argmax(ious))
            if ious[best] > t:
                tp += 1
                free.pop(best)
        fp = len(order) - tp
        fn = len(image.truth) - tp
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


def rsna_score(images: Sequence[ImageBoxes]) -> float:
    """The challenge score of a set: mean of :func:`rsna_image_score` over the images
    it does not skip (0 when it skips all)."""
    values = [s for s in (rsna_image_score(i) for i in images) if s is not None]
    return float(np.mean(values)) if values else 0.0


def box_sensitivity(images: Sequence[ImageBoxes], iou: float = 0.4) -> float:
    """Share of true boxes overlapped by some predicted box at IoU >= ``iou``."""
    hit = total = 0
    for image in images:
        for g in image.truth:
            total += 1
            hit += any(box_iou(p, g) >= iou for p, _ in image.predicted)
    return hit / total if total else float("nan")


def false_boxes_per_negative(images: Sequence[ImageBoxes]) -> float:
    """Mean number of predicted boxes on the images without a true box."""
    negatives = [len(i.predicted) for i in images if not i.truth]
    return float(np.mean(negatives)) if negatives else float("nan")


def froc(images: Sequence[ImageBoxes], iou: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(false boxes per image, box sensitivity) as the confidence cut-off falls through
    every predicted confidence; a predicted box is a hit when it overlaps a true box
    not yet hit at IoU >= ``iou``."""
    scored: list[tuple[float, int, int]] = []  # (confidence, image, prediction)
    for k, image in enumerate(images):
        scored += [(c, k, j) for j, (_, c) in enumerate(image.predicted)]
    scored.sort(key=lambda s: -s[0])
    total = sum(len(i.truth) for i in images)
    hit_truth: set[tuple[int, int]] = set()
    fps = hits = 0
    xs, ys = [0.0], [0.0]
    for _, k, j in scored:
        box = images[k].predicted[j][0]
        match = None
        for g, truth in enumerate(images[k].truth):
            if (k, g) not in hit_truth and box_iou(box, truth) >= iou:
                match = g
                break
        if match is None:
            fps += 1
        else:
            hit_truth.add((k, match))
            hits += 1
        xs.append(fps / max(len(images), 1))
        ys.append(hits / total if total else 0.0)
    return np.asarray(xs), np.asarray(ys)


__all__ = [
    "RSNA_THRESHOLDS",
    "ImageBoxes",
    "box_iou",
    "box_sensitivity",
    "false_boxes_per_negative",
    "froc",
    "rsna_image_score",
    "rsna_score",
]
