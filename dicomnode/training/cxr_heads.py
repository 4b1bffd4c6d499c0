"""Linear heads on frozen CXR features, and the measures that keep them honest.

* :func:`fit_softmax`: multinomial logistic regression (L2, per-image weights) fitted with
  L-BFGS on standardised features; returns a :class:`LinearHead` whose ``kernel`` and
  ``bias`` act on the *raw* features (the standardisation folded in), so it becomes the
  Keras model's final ``Dense`` layer unchanged.
* :func:`balance_weights`: image weights that give every (source, class) cell, or every
  class, the same total weight: source-balanced sampling in expectation.
* :func:`source_nuisance_projection`: a projection that removes the feature directions
  along which, *within one class*, the sources' means differ (the source signature that
  says nothing about disease); folded into the head, so the network is unchanged.
* :func:`shortcut_check`: how well the source can be predicted from features (a softmax
  fitted on one split, accuracy and balanced accuracy on another, against chance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

BALANCING = ("none", "class", "source_class")


@dataclass
class LinearHead:
    """``softmax(features @ kernel + bias)``; ``kernel`` ``(d, n_classes)``."""

    kernel: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.kernel + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def balance_weights(
    labels: Sequence[int] | np.ndarray, sources: Sequence[str], mode: str = "source_class"
) -> np.ndarray:
    """Per-image weights (mean 1): every class (``class``) or every (source, class) cell
    present (``source_class``) gets the same total; ``none`` gives 1 each."""
    y = np.asarray(labels)
    if mode == "none":
        return np.ones(len(y))
    if mode == "class":
        cells = [str(v) for v in y]
    elif mode == "source_class":
        cells = [f"{s}|{v}" for s, v in zip(sources, y, strict=True)]
    else:
        raise ValueError(f"unknown balancing {mode!r}; known: {', '.join(BALANCING)}")
    _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights * len(y) / weights.sum()


def fit_softmax(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    weights: np.ndarray | None = None,
    l2: float = 1.0,
    projection: np.ndarray | None = None,
    max_iter: int = 500,
) -> LinearHead:
    """Weighted L2 multinomial logistic regression; ``l2`` is the penalty on the
    standardised-feature weights per unit of total sample weight. ``projection``
    (``d x d``) is applied to the standardised features first and folded into the head."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    if projection is not None:
        z = z @ projection
    d = z.shape[1]
    onehot = np.eye(n_classes)[y]
    total = w.sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        kernel = theta[: d * n_classes].reshape(d, n_classes)
        bias = theta[d * n_classes :]
        logits = z @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        value = -(w * (onehot * log_p).sum(axis=1)).sum() / total
        value += 0.5 * l2 * float((kernel**2).sum()) / len(y)
        residual = (np.exp(log_p) - onehot) * w[:, None] / total
        grad_kernel = z.T @ residual + l2 * kernel / len(y)
        return value, np.concatenate([grad_kernel.ravel(), residual.sum(axis=0)])

    theta0 = np.zeros(d * n_classes + n_classes)
    result = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    kernel = result.x[: d * n_classes].reshape(d, n_classes)
    bias = result.x[d * n_classes :]
    # Fold standardisation (and projection) into a head on raw features.
    folded = kernel if projection is None else projection @ kernel
    raw_kernel = folded / std[:, None]
    raw_bias = bias - mean @ raw_kernel
    return LinearHead(raw_kernel, raw_bias)


def source_nuisance_projection(
    features: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    n_directions: int,
    min_images: int = 10,
) -> np.ndarray:
    """``d x d`` projection (on standardised features) removing the ``n_directions``
    principal directions of the within-class differences between source means.

    For every class, each source with at least ``min_images`` images of it contributes
    its mean minus the class's mean over those sources; the top singular directions of
    those differences are where sources differ while the disease is the same."""
    x = np.asarray(features, dtype=np.float64)
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    y = np.asarray(labels)
    src = np.asarray(sources)
    d = z.shape[1]
    if n_directions <= 0:
        return np.eye(d)
    rows = []
    for c in np.unique(y):
        means = [
            z[(y == c) & (src == s)].mean(axis=0)
            for s in np.unique(src[y == c])
            if ((y == c) & (src == s)).sum() >= min_images
        ]
        if len(means) >= 2:
            stacked = np.stack(means)
            rows.extend(stacked - stacked.mean(axis=0))
    if not rows:
        return np.eye(d)
    _, _, vt = np.linalg.svd(np.stack(rows), full_matrices=False)
    basis = vt[: min(n_directions, len(vt))]
    return np.eye(d) - basis.T @ basis


@dataclass(frozen=True)
class ShortcutCheck:
    """Source prediction from features: accuracy and balanced accuracy on held-out images."""

    accuracy: float
    balanced_accuracy: float
    chance_accuracy: float  # the majority source's share
    n_sources: int
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "chance_accuracy": self.chance_accuracy,
            "chance_balanced_accuracy": 1.0 / self.n_sources,
            "n_sources": self.n_sources,
            "n": self.n,
        }


def shortcut_check(
    train_features: np.ndarray,
    train_sources: Sequence[str],
    test_features: np.ndarray,
    test_sources: Sequence[str],
    l2: float = 1.0,
) -> ShortcutCheck:
    """How well a linear probe fitted on ``train`` predicts the source of ``test`` images
    (sources absent from ``train`` are left out of the test)."""
    names = sorted(set(train_sources))
    index = {s: i for i, s in enumerate(names)}
    y_train = np.array([index[s] for s in train_sources])
    keep = np.array([s in index for s in test_sources])
    y_test = np.array([index[s] for s, k in zip(test_sources, keep, strict=True) if k])
    head = fit_softmax(
        train_features,
        y_train,
        len(names),
        weights=balance_weights(y_train, list(train_sources), "class"),
        l2=l2,
    )
    pred = head.probabilities(np.asarray(test_features)[keep]).argmax(axis=1)
    recalls = [float((pred[y_test == k] == k).mean()) for k in np.unique(y_test)]
    counts = np.bincount(y_test, minlength=len(names))
    return ShortcutCheck(
        accuracy=float((pred == y_test).mean()),
        balanced_accuracy=float(np.mean(recalls)),
        chance_accuracy=float(counts.max() / counts.sum()),
        n_sources=len(np.unique(y_test)),
        n=int(y_test.size),
    )
