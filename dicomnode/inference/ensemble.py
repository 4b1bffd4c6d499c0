"""The classifier ensemble step: pre-process (lung crops or whole images to the members'
input, :func:`dicomnode.inference.cxr_domain.model_input`),
predict (every member), post-process (combine the members' probabilities).

The pipeline (:mod:`dicomnode.pipelines.cxr`), the CXR recipe's evaluation and the
ensemble tests use these same functions, so what is measured is what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from dicomnode.config import ENSEMBLE_STRATEGIES
from dicomnode.inference.cxr_domain import model_input
from dicomnode.inference.registry import ModelSpec

Predict = Callable[[np.ndarray], np.ndarray]


def classifier_input(images: Sequence[np.ndarray], spec: ModelSpec) -> np.ndarray:
    """Pre-process: grey ``uint8`` images (the lung crops for a ``crop = "lung"`` member,
    the whole images for ``crop = "whole"``) to the member's input,
    ``(images, h, w, channels)`` float32: the manifest's ``normalisation``, resized (area)
    to its input size, scaled by its ``scale``, grey repeated to its channels
    (:func:`~dicomnode.inference.cxr_domain.model_input`, which training calls too)."""
    return np.stack(
        [
            model_input(grey, spec.input_size, spec.normalisation, spec.scale, spec.channels)
            for grey in images
        ]
    )


def predict_members(x: np.ndarray | Sequence[np.ndarray], members: Sequence[Predict]) -> np.ndarray:
    """Predict: every member on its input (one array for all, or one per member),
    ``(members, images, classes)``."""
    inputs = [x] * len(members) if isinstance(x, np.ndarray) else list(x)
    if len(inputs) != len(members):
        raise ValueError(f"{len(members)} members but {len(inputs)} inputs")
    return np.stack([np.asarray(member(xi)) for member, xi in zip(members, inputs, strict=True)])


def combine(
    member_probabilities: np.ndarray,
    strategy: str = "weighted",
    weights: Sequence[float] | None = None,
    meta: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Combine members' class probabilities, shape (members, images, classes).

    * ``weighted``: sum of w_m * p_m over members, divided by the sum of weights;
    * ``mean``: the plain average;
    * ``vote``: the share of members whose top class is each class (majority vote as
      probabilities; ties are left as equal shares);
    * ``stacking``: ``meta`` applied to the members' outputs concatenated per image.

    Returns (images, classes); every row sums to 1.
    """
    p = np.asarray(member_probabilities, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"member probabilities must be (members, images, classes), got {p.shape}")
    members, _, classes = p.shape
    if strategy == "weighted":
        if weights is None or len(weights) != members:
            raise ValueError(f"weighted ensemble needs {members} weights, got {weights!r}")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {weights!r}")
        return np.tensordot(w, p, axes=1) / w.sum()
    if strategy == "mean":
        return p.mean(axis=0)
    if strategy == "vote":
        votes = np.eye(classes)[p.argmax(axis=2)]  # (members, images, classes)
        return votes.mean(axis=0)
    if strategy == "stacking":
        if meta is None:
            raise ValueError("stacking ensemble needs a meta model")
        stacked = np.concatenate(list(p), axis=1)  # (images, members * classes)
        out = np.asarray(meta(stacked.astype(np.float32)), dtype=np.float64)
        return out / out.sum(axis=1, keepdims=True)
    raise ValueError(
        f"unknown ensemble strategy {strategy!r}; use one of {', '.join(ENSEMBLE_STRATEGIES)}"
    )
