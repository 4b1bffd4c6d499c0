"""Evaluation metrics in numpy (no scikit-learn): masks, ROC/AUC, confusion, calibration.

Conventions: ``y_true`` holds integer class indices (0/1 for binary), scores and
probabilities are floats; masks are boolean or 0/1 arrays. Empty inputs and
one-class ROC problems raise ``ValueError`` with the reason, never return NaN silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A and B| / (|A| + |B|) of two masks; 1.0 when both are empty."""
    a = np.asarray(pred).astype(bool)
    b = np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union |A and B| / |A or B| of two masks; 1.0 when both are empty."""
    a = np.asarray(pred).astype(bool)
    b = np.asarray(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} and {b.shape}")
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def _binary(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary labels must be 0 or 1, got {sorted(set(y.tolist()))}")
    if y.min() == y.max():
        raise ValueError(f"ROC needs both classes; all labels are {int(y[0])}")
    return y, s


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per distinct score, from (0, 0) to (1, 1).

    Point ``i`` is the rate of predicting positive when ``score >= thresholds[i]``;
    the first threshold is ``inf`` (nothing positive). Tied scores make one point.
    """
    y, s = _binary(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U), ties counted as one half."""
    y, s = _binary(y_true, scores)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Average ranks (1-based) over runs of tied scores.
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    positives = int(y.sum())
    negatives = y.size - positives
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def one_vs_rest_auc(y_true: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """ROC AUC of each class (column of ``probabilities``) against all the others."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise ValueError(f"probabilities must be (n, classes) with n={y.size}, got {p.shape}")
    return [roc_auc((y == k).astype(np.int64), p[:, k]) for k in range(p.shape[1])]


def macro_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Unweighted mean of :func:`one_vs_rest_auc`."""
    return float(np.mean(one_vs_rest_auc(y_true, probabilities)))


def bootstrap_resamples(y_true: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """``count`` seeded resamples (with replacement) of the indices of ``y_true``, less
    those that miss a class of ``y_true`` (their one-vs-rest AUC is undefined)."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    if y.size == 0:
        raise ValueError("no labels to resample")
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, y.size, y.size) for _ in range(count)]
    n_classes = np.unique(y).size
    return [index for index in draws if np.unique(y[index]).size == n_classes]


@dataclass(frozen=True)
class PairedDifference:
    """Macro ROC AUC of model A minus model B on the same images, with its paired
    bootstrap distribution (both models scored on each resample)."""

    difference: float
    low: float  # 2.5th percentile
    high: float  # 97.5th percentile
    share_at_least_zero: float  # resamples where A is at least as high as B
    resamples: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "difference": self.difference,
            "ci95_low": self.low,
            "ci95_high": self.high,
            "share_at_least_zero": self.share_at_least_zero,
            "resamples": self.resamples,
        }


def paired_macro_auc_difference(
    y_true: np.ndarray,
    probabilities_a: np.ndarray,
    probabilities_b: np.ndarray,
    *,
    count: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """How sure a difference in macro ROC AUC between two models on one test set is:
    :class:`PairedDifference` over :func:`bootstrap_resamples` of the images."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    a, b = np.asarray(probabilities_a), np.asarray(probabilities_b)
    if a.shape != b.shape:
        raise ValueError(f"the two models' probabilities differ in shape: {a.shape} vs {b.shape}")
    resamples = bootstrap_resamples(y, count, seed)
    if not resamples:
        raise ValueError(f"no resample of {y.size} labels keeps every class")
    draws = np.array([macro_auc(y[i], a[i]) - macro_auc(y[i], b[i]) for i in resamples])
    low, high = np.percentile(draws, [2.5, 97.5])
    return PairedDifference(
        difference=macro_auc(y, a) - macro_auc(y, b),
        low=float(low),
        high=float(high),
        share_at_least_zero=float((draws >= 0).mean()),
        resamples=len(resamples),
    )


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of predictions equal to the truth."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"need equal, non-empty label arrays, got {y.size} and {p.size}")
    return float(np.mean(y == p))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``m[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    bad = [v for v in np.r_[y, p].tolist() if not 0 <= v < n_classes]
    if bad:
        raise ValueError(f"class indices must be in [0, {n_classes}), got {sorted(set(bad))}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y, p), 1)
    return matrix


@dataclass(frozen=True)
class Calibration:
    """Reliability bins and the expected calibration error.

    Bin ``i`` covers confidences in ``[edges[i], edges[i+1])`` (the last bin includes
    1.0). ``confidence[i]`` and ``frequency[i]`` are the mean predicted probability and
    the observed frequency of the event in the bin (NaN where ``count[i] == 0``).
    ``ece`` = sum over bins of ``count / n * |frequency - confidence|``.
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray
    ece: float

    def as_json(self) -> dict[str, object]:
        """Plain lists (NaN as ``None``) for ``metrics.json``."""

        def clean(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else round(float(v), 6) for v in values]

        return {
            "edges": [round(float(e), 6) for e in self.edges],
            "count": [int(c) for c in self.count],
            "confidence": clean(self.confidence),
            "frequency": clean(self.frequency),
            "ece": round(self.ece, 6),
        }


def calibration(probabilities: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> Calibration:
    """Reliability of predicted event ``probabilities`` against 0/1 ``outcomes``."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    o = np.asarray(outcomes, dtype=np.float64).ravel()
    if p.shape != o.shape or p.size == 0:
        raise ValueError(f"need equal, non-empty arrays, got {p.size} and {o.size}")
    if n_bins <= 0:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / count
        frequency = np.bincount(index, weights=o, minlength=n_bins) / count
    gaps = np.where(count > 0, np.abs(frequency - confidence), 0.0)
    ece = float(np.sum(count / p.size * gaps))
    return Calibration(edges, count, confidence, frequency, ece)


def top_label_calibration(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
) -> Calibration:
    """Multi-class calibration: confidence = highest probability, event = it was right."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    return calibration(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), n_bins)


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J).

    Returned as the midpoint between the chosen score and the next lower distinct
    score, so that small numeric differences do not flip decisions at the boundary.
    """
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    upper = thresholds[best]
    lower = thresholds[best + 1] if best + 1 < thresholds.size else upper
    return float((upper + lower) / 2.0)


def binary_summary(
    y_true: np.ndarray, scores: np.ndarray, threshold: float
) -> dict[str, float | int | list[list[int]]]:
    """AUC, accuracy, sensitivity, specificity and the confusion matrix at ``threshold``."""
    y, s = _binary(y_true, scores)
    pred = (s >= threshold).astype(np.int64)
    matrix = confusion_matrix(y, pred, 2)
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    return {
        "auc": roc_auc(y, s),
        "accuracy": accuracy(y, pred),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "threshold": float(threshold),
        "confusion_matrix": matrix.tolist(),
        "n": int(y.size),
    }


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of ``values``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values")
    return float(arr.mean()), float(arr.std())


__all__ = [
    "Calibration",
    "PairedDifference",
    "accuracy",
    "binary_summary",
    "bootstrap_resamples",
    "calibration",
    "confusion_matrix",
    "dice",
    "iou",
    "macro_auc",
    "mean_and_std",
    "one_vs_rest_auc",
    "paired_macro_auc_difference",
    "roc_auc",
    "roc_curve",
    "top_label_calibration",
    "youden_threshold",
]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))
