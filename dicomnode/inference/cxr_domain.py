"""What the multi-source CXR classifier needs at inference besides its network.

* :func:`normalise_intensity`: the intensity normalisation the model was trained with
  (histogram equalisation of the grey ``uint8`` image it sees, so exposure, film
  processing and bit depth of a hospital weigh less).
* :func:`apply_temperature` / :func:`fit_temperature`: temperature scaling of the
  softmax, fitted on validation logits (one scalar, minimum negative log-likelihood).
* :class:`MahalanobisGate`: an out-of-distribution score on the model's pooled
  features, fitted on training features (class means, one shared covariance shrunk
  towards its diagonal); the score is the smallest squared Mahalanobis distance to a
  class mean, and an image scoring above ``threshold`` is "outside the validated domain".
  The threshold is a quantile of the *validation* scores, so a stated share of
  in-domain images is flagged.

Everything here is numpy (and OpenCV for the equalisation), saved as a small ``.npz``
beside the model, so inference needs no training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: The normalisations the training compared (decided on validation).
NORMALISATIONS = ("none", "equalise")


def normalise_intensity(grey: np.ndarray, method: str = "equalise") -> np.ndarray:
    """Grey ``uint8`` image -> the same, normalised by ``method`` (see :data:`NORMALISATIONS`)."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    if method == "none":
        return grey
    if method == "equalise":
        return cv2.equalizeHist(grey)
    raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")


# ------------------------------------------------------------------------ calibration


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Rescale softmax ``probabilities`` as if their logits were divided by ``temperature``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    return softmax(logits / temperature)


def negative_log_likelihood(probabilities: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def fit_temperature(probabilities: np.ndarray, y: np.ndarray) -> float:
    """The temperature in [0.05, 20] (log-grid then refined) minimising validation NLL."""
    y = np.asarray(y, dtype=np.int64)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    losses = [negative_log_likelihood(apply_temperature(probabilities, t), y) for t in grid]
    best = int(np.argmin(losses))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.linspace(low, high, 41)
    losses = [negative_log_likelihood(apply_temperature(probabilities, t), y) for t in fine]
    return float(fine[int(np.argmin(losses))])


# ------------------------------------------------------------------------ OOD gate


@dataclass
class MahalanobisGate:
    """Class means and a shared precision matrix of training features, and a threshold."""

    means: np.ndarray  # (n_classes, d)
    precision: np.ndarray  # (d, d)
    threshold: float = float("inf")
    quantile: float = 0.0  # the validation quantile the threshold was set at

    @classmethod
    def fit(cls, features: np.ndarray, y: np.ndarray, shrinkage: float = 0.1) -> MahalanobisGate:
        """Fit on training ``features`` ``(n, d)`` with class labels ``y``."""
        features = np.asarray(features, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        classes = np.unique(y)
        means = np.stack([features[y == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, y)]
        covariance = centred.T @ centred / max(len(features) - len(classes), 1)
        diagonal = np.diag(np.diag(covariance))
        shrunk = (1 - shrinkage) * covariance + shrinkage * diagonal
        shrunk += np.eye(len(shrunk)) * 1e-6 * float(np.trace(shrunk)) / len(shrunk)
        return cls(means=means, precision=np.linalg.inv(shrunk))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, per row."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        distances = []
        for mean in self.means:
            d = features - mean
            distances.append(np.einsum("ij,jk,ik->i", d, self.precision, d))
        return np.min(np.stack(distances, axis=1), axis=1)

    def set_threshold(self, validation_features: np.ndarray, quantile: float = 0.99) -> float:
        """Threshold at the ``quantile`` of validation scores (in-domain images)."""
        self.threshold = float(np.quantile(self.score(validation_features), quantile))
        self.quantile = quantile
        return self.threshold

    def outside(self, features: np.ndarray) -> np.ndarray:
        """True where an image is outside the validated domain."""
        return self.score(features) > self.threshold

    def save(self, path: Path) -> None:
        np.savez(
            path,
            means=self.means,
            precision=self.precision,
            threshold=np.float64(self.threshold),
            quantile=np.float64(self.quantile),
        )

    @classmethod
    def load(cls, path: Path) -> MahalanobisGate:
        with np.load(path) as data:
            return cls(
                means=data["means"],
                precision=data["precision"],
                threshold=float(data["threshold"]),
                quantile=float(data["quantile"]),
            )
