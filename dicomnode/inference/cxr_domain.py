"""What the multi-source CXR classifier needs at inference besides its network.

* :func:`normalise_intensity`: the intensity normalisation the model was trained with
  (histogram equalisation of the grey ``uint8`` image it sees, so exposure, film
  processing and bit depth of a hospital weigh less).
* :func:`apply_temperature` / :func:`fit_temperature`: temperature scaling of the
  softmax, fitted on validation logits (one scalar, minimum negative log-likelihood).
* :class:`MahalanobisGate`: an out-of-distribution score on the model's pooled
  features, fitted on training features: the top principal directions of the training
  features, class means and one shared covariance (shrunk towards its diagonal) in that
  space. Two distances: the smallest squared Mahalanobis distance to a class mean inside
  the subspace, and the squared residual off it (a blank, blurred or noise image lands
  far *off* the subspace of chest films while its projection can look ordinary). Each is
  divided by its quantile on the *validation* images; the score is the larger ratio and
  an image scoring above 1 is "outside the validated domain", so about ``1 - quantile``
  of in-domain images per distance are flagged.

Everything here is numpy (and OpenCV for the equalisation), saved as a small ``.npz``
beside the model, so inference needs no training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dicomnode.inference.registry import NORMALISATIONS

__all__ = ["NORMALISATIONS", "DomainModel", "MahalanobisGate", "model_input", "normalise_intensity"]


def normalise_intensity(grey: np.ndarray, method: str = "equalise") -> np.ndarray:
    """Grey ``uint8`` image -> the same, normalised by ``method`` (see :data:`NORMALISATIONS`)."""
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {grey.dtype} {grey.shape}")
    if method == "none":
        return grey
    if method == "equalise":
        return cv2.equalizeHist(grey)
    raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")


def model_input(
    grey: np.ndarray,
    size: int | tuple[int, int],
    normalise: str,
    scale: float = 1 / 255,
    channels: int = 3,
) -> np.ndarray:
    """Grey ``uint8`` image (already cropped if wanted) -> the network's input,
    ``(height, width, channels)`` float32: :func:`normalise_intensity`, resized (area) to
    ``size``, repeated on ``channels`` and multiplied by ``scale``. Training
    (:mod:`dicomnode.training.cxr_features`) and the node's pipeline both call this."""
    height, width = (size, size) if isinstance(size, int) else size
    pixels = cv2.resize(
        normalise_intensity(grey, normalise), (width, height), interpolation=cv2.INTER_AREA
    )
    return np.repeat(pixels.astype(np.float32)[..., None] * np.float32(scale), channels, axis=-1)


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
    """PCA of training features, class means and a shared precision in that space, and
    the validation scales of the two distances (see the module)."""

    centre: np.ndarray  # (d,) training feature mean
    basis: np.ndarray  # (d, k) principal directions
    means: np.ndarray  # (n_classes, k)
    precision: np.ndarray  # (k, k)
    mahalanobis_scale: float = float("inf")
    residual_scale: float = float("inf")
    quantile: float = 0.0  # the validation quantile the scales were set at
    threshold: float = 1.0  # a score above this is outside the domain

    @classmethod
    def fit(
        cls, features: np.ndarray, y: np.ndarray, components: int = 64, shrinkage: float = 0.1
    ) -> MahalanobisGate:
        """Fit on training ``features`` ``(n, d)`` with class labels ``y``: the top
        ``components`` principal directions, then class means and a shared covariance
        (shrunk ``shrinkage`` of the way to its diagonal) in that space."""
        features = np.asarray(features, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        centre = features.mean(axis=0)
        _, _, vt = np.linalg.svd(features - centre, full_matrices=False)
        basis = vt[: min(components, len(vt))].T
        z = (features - centre) @ basis
        classes = np.unique(y)
        means = np.stack([z[y == c].mean(axis=0) for c in classes])
        centred = z - means[np.searchsorted(classes, y)]
        covariance = centred.T @ centred / max(len(z) - len(classes), 1)
        shrunk = (1 - shrinkage) * covariance + shrinkage * np.diag(np.diag(covariance))
        shrunk += np.eye(len(shrunk)) * 1e-6 * float(np.trace(shrunk)) / len(shrunk)
        return cls(centre, basis, means, np.linalg.inv(shrunk))

    def distances(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(smallest squared Mahalanobis distance to a class mean in the subspace,
        squared residual off the subspace), per row."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.centre
        z = x @ self.basis
        inside = []
        for mean in self.means:
            d = z - mean
            inside.append(np.einsum("ij,jk,ik->i", d, self.precision, d))
        residual = ((x - z @ self.basis.T) ** 2).sum(axis=1)
        return np.min(np.stack(inside, axis=1), axis=1), residual

    def score(self, features: np.ndarray) -> np.ndarray:
        """The larger of the two distances over its validation scale (> 1: outside)."""
        inside, residual = self.distances(features)
        return np.maximum(inside / self.mahalanobis_scale, residual / self.residual_scale)

    def set_threshold(self, validation_features: np.ndarray, quantile: float = 0.99) -> float:
        """Scale both distances by their ``quantile`` on validation (in-domain) images."""
        inside, residual = self.distances(validation_features)
        self.mahalanobis_scale = float(np.quantile(inside, quantile))
        self.residual_scale = float(np.quantile(residual, quantile))
        self.quantile = quantile
        return self.threshold

    def outside(self, features: np.ndarray) -> np.ndarray:
        """True where an image is outside the validated domain."""
        return self.score(features) > self.threshold

    def arrays(self, prefix: str = "gate_") -> dict[str, Any]:
        return {
            f"{prefix}centre": self.centre.astype(np.float32),
            f"{prefix}basis": self.basis.astype(np.float32),
            f"{prefix}means": self.means.astype(np.float32),
            f"{prefix}precision": self.precision.astype(np.float64),
            f"{prefix}mahalanobis_scale": np.float64(self.mahalanobis_scale),
            f"{prefix}residual_scale": np.float64(self.residual_scale),
            f"{prefix}quantile": np.float64(self.quantile),
            f"{prefix}threshold": np.float64(self.threshold),
        }

    @classmethod
    def from_arrays(cls, data: Any, prefix: str = "gate_") -> MahalanobisGate:
        return cls(
            centre=np.asarray(data[f"{prefix}centre"], dtype=np.float64),
            basis=np.asarray(data[f"{prefix}basis"], dtype=np.float64),
            means=np.asarray(data[f"{prefix}means"], dtype=np.float64),
            precision=np.asarray(data[f"{prefix}precision"], dtype=np.float64),
            mahalanobis_scale=float(data[f"{prefix}mahalanobis_scale"]),
            residual_scale=float(data[f"{prefix}residual_scale"]),
            quantile=float(data[f"{prefix}quantile"]),
            threshold=float(data[f"{prefix}threshold"]),
        )


#: File beside the model holding what :class:`DomainModel` needs.
DOMAIN_FILE = "domain.npz"


@dataclass
class DomainModel:
    """Everything beside the network: normalisation, temperature, the OOD gate, the
    pneumonia subtype head (bacterial vs viral on pooled features) and the operating
    points (calibrated probability at or above which a finding is Present)."""

    normalisation: str
    temperature: float
    gate: MahalanobisGate
    subtype_kernel: np.ndarray  # (1280, 2): bacterial, viral
    subtype_bias: np.ndarray  # (2,)
    operating_points: dict[str, float]

    def save(self, folder: Path) -> Path:
        path = Path(folder) / DOMAIN_FILE
        names = sorted(self.operating_points)
        np.savez(
            path,
            normalisation=np.array(self.normalisation),
            temperature=np.float64(self.temperature),
            subtype_kernel=self.subtype_kernel.astype(np.float32),
            subtype_bias=self.subtype_bias.astype(np.float32),
            operating_point_names=np.array(names),
            operating_point_values=np.array([self.operating_points[n] for n in names]),
            **self.gate.arrays(),
        )
        return path

    @classmethod
    def load(cls, folder: Path) -> DomainModel:
        path = Path(folder) / DOMAIN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {DOMAIN_FILE} in {str(folder)!r}")
        with np.load(path) as data:
            names = [str(n) for n in data["operating_point_names"]]
            return cls(
                normalisation=str(data["normalisation"]),
                temperature=float(data["temperature"]),
                gate=MahalanobisGate.from_arrays(data),
                subtype_kernel=np.asarray(data["subtype_kernel"], dtype=np.float64),
                subtype_bias=np.asarray(data["subtype_bias"], dtype=np.float64),
                operating_points=dict(
                    zip(names, (float(v) for v in data["operating_point_values"]), strict=True)
                ),
            )

    def findings(self, probabilities: dict[str, float]) -> dict[str, bool]:
        """Post-process: each class with an operating point, Present (True) when its
        calibrated probability is at or above that point."""
        return {
            name: float(probabilities[name]) >= point
            for name, point in self.operating_points.items()
            if name in probabilities
        }

    def viral_probability(self, pooled: np.ndarray) -> np.ndarray:
        """P(viral | pneumonia) from pooled features (the subtype head)."""
        logits = np.atleast_2d(pooled) @ self.subtype_kernel + self.subtype_bias
        return softmax(logits)[:, 1]
