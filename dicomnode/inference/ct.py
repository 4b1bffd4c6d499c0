"""The CT steps: lung mask (classical, or a model's pre/post-process), slice preparation,
the slice classifier's pre-process (:func:`classifier_batch`) and post-process
(:func:`slice_probabilities`), and the study aggregation.

No DICOM here and no model object: numpy and OpenCV on one slice of Hounsfield units
at a time (the caller predicts), so each step can be checked numerically and training
code imports the same preparation (:func:`prepare_slice`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from dicomnode.config import CT_AGGREGATIONS
from dicomnode.inference.geometry import Box, crop, lung_box
from dicomnode.inference.lung import LUNG_THRESHOLD, keep_largest
from dicomnode.inference.registry import ModelSpec

#: Lung window (HU) used when a classifier manifest gives none: center -600, width 1500.
LUNG_WINDOW = (-600.0, 1500.0)
#: Air inside the body below this is lung (or airway, or bowel gas).
LUNG_THRESHOLD_HU = -400.0
#: Tissue above this belongs to the body (skin, fat, muscle, bone); below is air.
BODY_THRESHOLD_HU = -500.0
#: Air regions whose interior median is below this are gas (bowel, stomach, trachea).
GAS_HU = -900.0
#: Air pockets smaller than this (mm^2) are dropped (vessels' gaps, noise, small bowel gas).
MIN_COMPONENT_MM2 = 300.0
_KERNEL3 = np.ones((3, 3), np.uint8)
#: Study-score aggregations of the per-slice probabilities.


@dataclass(frozen=True)
class LungMask:
    """A slice's lung mask and what the pipeline keeps of it."""

    mask: np.ndarray
    """Boolean (Rows, Columns), True on lung."""
    fraction: float
    """Lung pixels over body pixels (0 when there is no body)."""
    box: Box | None
    """The lung extent relaxed by 5 % per side (:func:`~dicomnode.inference.geometry.lung_box`)."""


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The patient's body: the largest connected region above ``threshold``, holes filled.

    The largest region is the trunk; the table, the blanket and the gantry are separate
    smaller regions (a thin air gap parts them after a one-pixel opening) and are dropped.
    Filling holes brings the lungs and airways inside; the air around the patient stays out.
    """
    tissue = cv2.morphologyEx((hu > threshold).astype(np.uint8), cv2.MORPH_OPEN, _KERNEL3)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(tissue, connectivity=8)
    if count <= 1:
        return np.zeros(hu.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return fill_holes(labels == largest)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses filled (what cannot be reached from the border)."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8), (0, 0), 1)
    outside_or_mask = flood[1:-1, 1:-1].astype(bool)
    return mask.astype(bool) | ~outside_or_mask


def lung_mask_hu(
    hu: np.ndarray,
    pixel_spacing: tuple[float, float] | None = None,
    threshold: float = LUNG_THRESHOLD_HU,
    min_component_mm2: float = MIN_COMPONENT_MM2,
    gas_hu: float = GAS_HU,
) -> LungMask:
    """The classical lung mask of one axial slice, from Hounsfield units alone (no weights).

    1. body: :func:`body_mask` (outside air and the table removed);
    2. air inside the body: the slice smoothed (Gaussian, sigma 1.5 mm) below ``threshold``
       (about -400 HU), so that ground glass with aerated lung around it stays lung;
    3. regions: connected components of at least ``min_component_mm2`` (pixel area from
       ``pixel_spacing``, 0.7 mm assumed when unknown) not touching the image border;
    4. gas is not lung: a region whose interior (eroded by 2 pixels) has a median below
       ``gas_hu`` (-900 HU) is bowel or stomach gas, or a large airway (trachea, main
       bronchi: the optional airway removal), and is dropped. Aerated lung has vessels and
       interstitium in it: its median is about -900 to -600 HU, higher with disease. (A
       severely emphysematous lung can fall below -900; lower ``gas_hu`` for such sites.)
    5. the kept regions, holes filled (vessels inside the lung).

    ``fraction`` is the lung area over the body area: tens of per cent on a chest slice,
    nearly none on an abdominal one.
    """
    if hu.ndim != 2:
        raise ValueError(f"a slice of HU must be 2-D, got shape {hu.shape}")
    body = body_mask(hu)
    body_pixels = int(body.sum())
    if body_pixels == 0:
        return LungMask(np.zeros(hu.shape, bool), 0.0, None)
    dy, dx = pixel_spacing or (0.7, 0.7)
    smooth = cv2.GaussianBlur(hu, (0, 0), sigmaX=1.5 / dx, sigmaY=1.5 / dy)
    air = (np.asarray(smooth) < threshold) & body
    floor = min_component_mm2 / (dy * dx)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(air.astype(np.uint8), connectivity=8)
    rows, cols = hu.shape
    keep = []
    kernel = np.ones((5, 5), np.uint8)
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < floor or x == 0 or y == 0 or x + w >= cols or y + h >= rows:
            continue
        region = labels[y : y + h, x : x + w] == label
        interior = cv2.erode(region.astype(np.uint8), kernel).astype(bool)
        values = hu[y : y + h, x : x + w][interior if interior.sum() >= 20 else region]
        median = float(np.median(values))
        if gas_hu <= median < threshold:
            keep.append(label)
    if not keep:
        return LungMask(np.zeros(hu.shape, bool), 0.0, None)
    mask = fill_holes(np.isin(labels, keep))
    return LungMask(mask, float(mask.sum()) / body_pixels, lung_box(mask))


def window_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU clipped to the window [center - width/2, center + width/2], linear to 0..255 uint8."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width!r}")
    low = center - width / 2.0
    unit = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def lung_crop_uint8(
    hu: np.ndarray,
    box: Box | None,
    size: tuple[int, int],
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """Steps 1-3 of :func:`prepare_slice`: window to uint8, crop to ``box``, resize.

    Returns uint8 of shape ``size`` (height, width); the whole slice when ``box`` is None.
    """
    pixels = window_uint8(hu, *window)
    if box is None:
        box = Box(0, 0, pixels.shape[1], pixels.shape[0])
    return crop(pixels, box, size)


def to_model_input(crops: np.ndarray, channels: int, scale: float) -> np.ndarray:
    """Steps 4-5 of :func:`prepare_slice` on uint8 crops (N, H, W): float32 (N, H, W, channels)."""
    x = np.asarray(crops, dtype=np.float32)[..., None] * np.float32(scale)
    return np.repeat(x, channels, axis=-1) if channels > 1 else x


def prepare_slice(
    hu: np.ndarray,
    lung: np.ndarray | Box | None,
    size: tuple[int, int],
    channels: int,
    scale: float = 1 / 255,
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """One CT slice as the slice classifier's input: THE preparation contract.

    Training and inference both use this, so that the classifier sees at inference
    what it was trained on (8-bit PNG crops of the lung window):

    1. HU clipped to the manifest window (``window`` = (center, width), default the lung
       window -600 / 1500) and mapped linearly to uint8 0..255 (:func:`window_uint8`);
    2. cropped to the slice's lung-mask bounding box relaxed by 5 % of its extent per
       side (:func:`~dicomnode.inference.geometry.lung_box`; ``lung`` is the mask or the
       box already made from it; the whole slice when None or empty);
    3. resized to the manifest ``size`` (height, width) with ``cv2.INTER_AREA``;
    4. repeated to ``channels`` (1 or 3);
    5. multiplied by ``scale`` (the manifest's, 1/255 by default).

    Returns float32 of shape (height, width, channels). Steps 1-3 are
    :func:`lung_crop_uint8` (what a training set stores as PNG), steps 4-5
    :func:`to_model_input`.
    """
    box = lung_box(lung) if isinstance(lung, np.ndarray) else lung
    crop8 = lung_crop_uint8(hu, box, size, window)
    return to_model_input(crop8[None], channels, scale)[0]


def aggregate(
    probabilities: Sequence[float] | np.ndarray,
    method: str = "max",
    top_k: int = 5,
    percentile: float = 95.0,
) -> float:
    """The study score from per-slice probabilities.

    * ``max``: the highest slice probability;
    * ``top_k_mean``: the mean of the ``top_k`` highest (all of them when fewer);
    * ``percentile``: the ``percentile``-th percentile (linear interpolation).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no slice probabilities to aggregate")
    if method == "max":
        return float(p.max())
    if method == "top_k_mean":
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        return float(np.sort(p)[::-1][:top_k].mean())
    if method == "percentile":
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        return float(np.percentile(p, percentile))
    raise ValueError(f"unknown aggregation {method!r}; use one of {', '.join(CT_AGGREGATIONS)}")


def lung_model_input(
    hu: np.ndarray, spec: ModelSpec, window: tuple[float, float] = LUNG_WINDOW
) -> np.ndarray:
    """Pre-process for a lung-mask model: the slice in ``window``, resized (area) to the
    model's input, ``(1, h, w, channels)`` float32 scaled by its ``scale``."""
    h, w = spec.input_size
    grey = window_uint8(hu, *window)
    return to_model_input(
        cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)[None], spec.channels, spec.scale
    )


def lung_mask_from_model(probability: np.ndarray, hu: np.ndarray) -> LungMask:
    """Post-process of a lung-mask model's ``(h, w)`` output for the slice ``hu``:
    thresholded, the two largest components, resized (nearest) to the slice; the
    fraction is over the body (:func:`body_mask`)."""
    small = keep_largest(np.asarray(probability) >= LUNG_THRESHOLD)
    mask = cv2.resize(
        small.astype(np.uint8), (hu.shape[1], hu.shape[0]), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    body = int(body_mask(hu).sum())
    return LungMask(mask, float(mask.sum()) / body if body else 0.0, lung_box(mask))


def classifier_batch(crops: Sequence[np.ndarray], spec: ModelSpec, batch_size: int) -> np.ndarray:
    """Pre-process for the slice classifier: uint8 crops (at the input size) padded with
    zeros to at least ``batch_size`` (so that the model always sees one input shape, no
    retracing for each study's last batch), then :func:`to_model_input`."""
    batch = np.zeros((max(batch_size, len(crops)), *spec.input_size), np.uint8)
    if crops:
        batch[: len(crops)] = np.stack(crops)
    return to_model_input(batch, spec.channels, spec.scale)


def slice_probabilities(output: np.ndarray, count: int) -> np.ndarray:
    """Post-process of the classifier's (padded) batch output: P(finding) of the first
    ``count`` slices, float64."""
    out = np.asarray(output, dtype=np.float64)
    return out.reshape(out.shape[0], -1)[:count, 0]
