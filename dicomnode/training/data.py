"""Training data: grey images from files, patient-level splits, seeded augmentation.

Splits are by *group* (a patient, or whatever identifies one when there are no patient
IDs), never by image, and are computed, not stored: each group's rank is the SHA-256 of
``salt + ":" + key``; within each stratum (e.g. a class) the groups in rank order fill
the train, validation and test fractions in turn. The same keys, salt and fractions
always give the same split, so no file list is committed, and a stratum's groups are
spread over every split in proportion.

Augmentation follows seed 000's ``ImageDataGenerator`` arguments for the lung U-Net
(rotation 10 degrees, width/height shift 0.05, shear 5 degrees, zoom 0.3, horizontal
flip, ``fill_mode="nearest"``); a mask gets exactly the image's transform.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dicomnode.training import TrainingError

#: Split names, in the order the fractions are given.
SPLITS = ("train", "val", "test")
#: Default fractions of groups per split.
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)

_DICOM_SUFFIXES = {".dcm", ".dicom"}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with path.open("rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def read_grey(path: Path | str) -> np.ndarray:
    """Read an image file as a 2-D ``uint8`` grey array (0 dark, 255 bright).

    DICOM files go through :func:`dicomnode.imaging.to_uint8` (the node's own
    conversion, so training sees what the node sees). PNG/JPEG in modes L, LA, P, RGB,
    RGBA are converted to luminance (ITU-R 601) ignoring alpha; 16-bit grey is scaled
    by its min and max. Unreadable files raise :class:`TrainingError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"image not found: {str(path)!r}")
    if _is_dicom(path):
        from dicomnode.imaging import to_uint8

        try:
            return to_uint8(path).pixels
        except Exception as exc:
            raise TrainingError(f"{str(path)!r}: not a usable DICOM image: {exc}") from exc
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                values = np.asarray(image, dtype=np.float64)
                low, high = float(values.min()), float(values.max())
                span = high - low if high > low else 1.0
                return np.rint((values - low) / span * 255.0).astype(np.uint8)
            colour = image.convert("RGB") if image.mode in ("RGBA", "LA", "P", "PA") else image
            return np.asarray(colour.convert("L"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TrainingError(f"{str(path)!r}: not a readable image: {exc}") from exc


def resize(image: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Resize to ``size`` (height, width) with ``cv2.INTER_AREA``, as the pipelines do."""
    height, width = (size, size) if isinstance(size, int) else size
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Resize a 0/1 mask to ``size`` (area-average, then > 0.5): a 0/1 ``uint8`` mask."""
    resized = resize(mask.astype(np.float32), size)
    return (resized > 0.5).astype(np.uint8)


# --- splits ----------------------------------------------------------------------------


def _rank(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def split_groups(
    keys: Iterable[str],
    salt: str,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    strata: Mapping[str, Hashable] | None = None,
) -> dict[str, str]:
    """Assign each distinct group key to ``"train"``, ``"val"`` or ``"test"``.

    Within each stratum (``strata[key]``; one stratum when ``None``), groups sorted by
    the SHA-256 of ``salt:key`` take ``round`` of the cumulative fractions in turn, so
    every split of a stratum with at least ``1 / fraction`` groups gets some. The
    result depends only on the keys, the salt, the fractions and the strata.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions):
        raise TrainingError(f"split fractions must be three numbers >= 0, got {fractions!r}")
    total = float(sum(fractions))
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise TrainingError(f"split fractions must add up to 1, got {fractions!r}")
    unique = sorted(set(keys))
    by_stratum: dict[Hashable, list[str]] = {}
    for key in unique:
        stratum = strata[key] if strata is not None else None
        by_stratum.setdefault(stratum, []).append(key)
    assignment: dict[str, str] = {}
    for members in by_stratum.values():
        ordered = sorted(members, key=lambda k: _rank(salt, k))
        n = len(ordered)
        bounds = [round(n * sum(fractions[: i + 1])) for i in range(len(SPLITS))]
        start = 0
        for split, end in zip(SPLITS, bounds, strict=True):
            for key in ordered[start:end]:
                assignment[key] = split
            start = end
    return assignment


def assert_group_disjoint(groups: Sequence[str], splits: Sequence[str]) -> None:
    """Raise :class:`TrainingError` if any group has items in more than one split."""
    if len(groups) != len(splits):
        raise TrainingError(f"{len(groups)} group keys but {len(splits)} split labels")
    seen: dict[str, str] = {}
    for group, split in zip(groups, splits, strict=True):
        if seen.setdefault(group, split) != split:
            raise TrainingError(
                f"group {group!r} is in both the {seen[group]!r} and the {split!r} split"
            )


def split_indices(splits: Sequence[str]) -> dict[str, np.ndarray]:
    """The positions of each split's items (``train``, ``val``, ``test``), in order."""
    return {
        split: np.array([i for i, x in enumerate(splits) if x == split], dtype=np.int64)
        for split in SPLITS
    }


def split_counts(splits: Sequence[str], groups: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{split: {"images": n, "groups": m}}`` for the model card."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        chosen = [g for g, s in zip(groups, splits, strict=True) if s == split]
        counts[split] = {"images": len(chosen), "groups": len(set(chosen))}
    return counts


# --- augmentation --------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """Random affine augmentation (Keras ``ImageDataGenerator`` semantics, numpy + OpenCV).

    ``rotation`` and ``shear`` in degrees (uniform in +-value), ``shift`` as a fraction
    of the size (uniform in +-value), ``zoom`` as in Keras (scale uniform in
    ``[1 - zoom, 1 + zoom]``), ``horizontal_flip`` with probability 0.5. Borders repeat
    the nearest pixel (``fill_mode="nearest"``).
    """

    rotation: float = 10.0
    shift: float = 0.05
    shear: float = 5.0
    zoom: float = 0.3
    horizontal_flip: bool = True

    def matrix(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """A random 2x3 affine matrix (output -> input pixel map is its inverse) and flip."""
        angle = math.radians(rng.uniform(-self.rotation, self.rotation))
        shear = math.radians(rng.uniform(-self.shear, self.shear))
        zx, zy = rng.uniform(1 - self.zoom, 1 + self.zoom, size=2) if self.zoom else (1.0, 1.0)
        tx = rng.uniform(-self.shift, self.shift) * width
        ty = rng.uniform(-self.shift, self.shift) * height
        flip = bool(self.horizontal_flip and rng.random() < 0.5)
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        to_centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
        back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], dtype=np.float64)
        rot = np.array(
            [
                [math.cos(angle), -math.sin(angle), 0],
                [math.sin(angle), math.cos(angle), 0],
                [0, 0, 1],
            ]
        )
        shr = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
        # Keras zooms by sampling the input at zx * x, so the image shrinks for zx > 1.
        zoom = np.diag([1.0 / zx, 1.0 / zy, 1.0])
        mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
        forward = back @ rot @ shr @ zoom @ mirror @ to_centre
        return forward[:2]

    def apply(
        self,
        rng: np.random.Generator,
        image: np.ndarray,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Transform ``image`` (H x W or H x W x C) and, identically, ``mask`` (nearest)."""
        height, width = image.shape[:2]
        forward = self.matrix(rng, height, width)
        out = cv2.warpAffine(
            image, forward, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        if out.ndim < image.ndim:
            out = out[..., None]
        out_mask = None
        if mask is not None:
            out_mask = cv2.warpAffine(
                mask,
                forward,
                (width, height),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_REPLICATE,
            )
            if out_mask.ndim < mask.ndim:
                out_mask = out_mask[..., None]
        return out, out_mask


@dataclass(frozen=True)
class IntensityJitter:
    """Random grey-level changes of a ``uint8`` image: gamma, contrast, brightness.

    ``gamma``: the exponent is ``exp(uniform(-gamma, gamma))``; ``contrast``: values are
    scaled about the image mean by ``uniform(1 - contrast, 1 + contrast)``;
    ``brightness``: ``uniform(-brightness, brightness)`` grey levels are added. It
    teaches a model that windowing and exposure, which differ between sources, carry
    no label.
    """

    gamma: float = 0.4
    contrast: float = 0.3
    brightness: float = 25.0

    def apply(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """The jittered image, ``uint8``, same shape."""
        exponent = math.exp(rng.uniform(-self.gamma, self.gamma))
        factor = rng.uniform(1 - self.contrast, 1 + self.contrast)
        shift = rng.uniform(-self.brightness, self.brightness)
        values = 255.0 * (image.astype(np.float64) / 255.0) ** exponent
        mean = float(values.mean())
        values = (values - mean) * factor + mean + shift
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)


#: Seed 000's U-Net augmentation (``data_gen_args``).
SEED000_AUGMENTATION = Augmentation()


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The numpy generator of one epoch: the same (seed, epoch) always gives the same one.

    Deriving it from the epoch number (not from state carried across epochs) is what
    makes a resumed run draw the same batches and augmentations as an uninterrupted one.
    """
    return np.random.default_rng([seed, epoch, stream])


def batches(
    count: int, batch_size: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Index batches covering ``range(count)``, shuffled by ``rng`` when given."""
    if batch_size <= 0:
        raise TrainingError(f"batch size must be positive, got {batch_size}")
    order = rng.permutation(count) if rng is not None else np.arange(count)
    return [order[i : i + batch_size] for i in range(0, count, batch_size)]


__all__ = [
    "DEFAULT_FRACTIONS",
    "SEED000_AUGMENTATION",
    "SPLITS",
    "Augmentation",
    "IntensityJitter",
    "assert_group_disjoint",
    "batches",
    "epoch_rng",
    "read_grey",
    "resize",
    "resize_mask",
    "split_counts",
    "split_groups",
]
