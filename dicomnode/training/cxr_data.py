"""The three-class chest X-ray set of the classifier ensemble, split by patient.

Classes, in the members' output order, with the codes the manifests carry:

====  ===========  ==========================================  =====================
index name         images mapped to it                         code (SCT)
====  ===========  ==========================================  =====================
0     pneumonia    ieee8023 ``bacterial`` and ``viral_non_covid``;  233604007 Pneumonia
                   3-class set ``Viral Pneumonia``
1     covid19      ieee8023 ``covid19``; 3-class set ``Covid``   840539006 COVID-19
2     normal       ieee8023 ``normal`` (No Finding);            17621005 Normal
                   3-class set ``Normal``
====  ===========  ==========================================  =====================

(The seed's published models use ``bacterial, covid19, normal``; this set has too few
bacterial images for a class of their own, so class 0 is every pneumonia other than
COVID-19.)

Sources, under the data root (read at training time, never copied), named in :data:`SOURCES`:

* ``ieee8023``: ``cxr_classification/ieee8023_covid_chestxray_subset`` (``labels.csv``
  with ``patientid``);
* ``3class``: ``cxr_classification/covid19_image_dataset_3class_640px`` (``labels.csv``,
  no patient IDs);
* ``nlm``: the **adult normal** radiographs of the NLM Montgomery and Shenzhen sets in
  ``cxr_lung_masks/montgomery_shenzhen_512px`` (``pairs.csv``, ``tb_label`` ``normal``;
  one image per patient; the tuberculosis images have no class here and are left out).
  The two other sources' normals are mostly pediatric (Kermany) while their COVID-19
  images are adult, and members trained without adult normals called 50 of these 60
  adult normal radiographs COVID-19: the class followed the patient's age, not the lungs.

Splits are by **group**, never by image. A group is an ieee8023 patient; a 3-class image
has no patient ID and is its own group. The 3-class set's COVID images come from the
same upstream collection as ieee8023 (resized to 640 x 640), and both sets hold a few
copies of one image under different names, so before splitting, near-duplicates are
found across *both* sources: every image is reduced to a 32 x 32 grey thumbnail
(area-averaged, so the squeeze to 640 x 640 does not matter), z-scored, and two images
whose thumbnails correlate at :data:`DUPLICATE_CORRELATION` or more are the same picture
(on this data the duplicates correlate at 0.97 or more and the closest distinct images
at 0.944). Duplicates are merged by union-find; of each set one image is kept (the
ieee8023 original when there is one: it has the upstream metadata and full resolution,
else the first path), and the groups of all its copies become one group, so no picture
can appear in two splits under different names. The 3-class set labels some ieee8023
SARS, Streptococcus and "No Finding" images "Covid"; dropping the copy keeps the
ieee8023 label. Groups are assigned to train/val/test by
:func:`dicomnode.training.data.split_groups` (SHA-256 rank of the group key), stratified
by source and class.

The classifiers' input is, by default, what the node feeds them: the **lung crop**
(``crop="lung"``). Every kept image's grey ``uint8`` pixels go through the CXR
pipeline's own :func:`~dicomnode.pipelines.cxr.lung_masks` and
:func:`~dicomnode.pipelines.cxr.lung_crop` with the lung U-Net of ``models/`` (or the one
given), so training, evaluation and the node see the same crop. The crops are cached
under ``build/cache/cxr-lung-crops/`` (ignored by git), keyed by the lung model's
SHA-256 and the crop size. ``crop="none"`` is the whole image resized to the input.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from dicomnode.training import TrainingError
from dicomnode.training.data import (
    SPLITS,
    assert_group_disjoint,
    read_grey,
    resize,
    split_counts,
    split_groups,
)
from dicomnode.training.export import ClassCode

#: The members' classes in output order, with their SNOMED CT codes.
CXR_CLASSES: tuple[ClassCode, ...] = (
    ClassCode("pneumonia", "233604007", "SCT", "Pneumonia"),
    ClassCode("covid19", "840539006", "SCT", "COVID-19"),
    ClassCode("normal", "17621005", "SCT", "Normal"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CXR_CLASSES)

#: Folder of the two sources under the data root.
CXR_DIR = "cxr_classification"
IEEE_DIR = "ieee8023_covid_chestxray_subset"
THREE_CLASS_DIR = "covid19_image_dataset_3class_640px"
#: The NLM Montgomery/Shenzhen pairs (lung-mask data) under the data root.
NLM_DIR = "cxr_lung_masks/montgomery_shenzhen_512px"
#: Every source, in reading order; ``[training] sources`` of a manifest names those used.
SOURCES = ("ieee8023", "3class", "nlm")
#: The sources of models trained before ``sources`` was recorded.
LEGACY_SOURCES = ("ieee8023", "3class")

#: Source label -> class name, per source.
IEEE_LABELS = {
    "bacterial": "pneumonia",
    "viral_non_covid": "pneumonia",
    "covid19": "covid19",
    "normal": "normal",
}
THREE_CLASS_LABELS = {"viral_pneumonia": "pneumonia", "covid19": "covid19", "normal": "normal"}

#: Thumbnail side and correlation at or above which two images are the same picture.
THUMBNAIL_SIZE = 32
DUPLICATE_CORRELATION = 0.96
#: What the classifiers see: the node's lung crop, or the whole image.
CROPS = ("lung", "none")
#: The lung model that makes the crops when none is given.
DEFAULT_LUNG_MODEL = Path(__file__).resolve().parents[2] / "models" / "cxr-lung-unet"
#: Where the lung crops are cached (ignored by git).
CROP_CACHE = Path(__file__).resolve().parents[2] / "build" / "cache" / "cxr-lung-crops"
#: Default split fractions (train, val, test) of groups and the split salt.
CXR_FRACTIONS = (0.6, 0.2, 0.2)
CXR_SALT = "cxr-3class-v1"


@dataclass
class CXRImage:
    """One image of the set: where it is, what it shows, its group and split."""

    path: Path
    source: str
    source_label: str
    label: int
    group: str
    split: str = ""


@dataclass
class CXRSet:
    """The kept images (with their ``size`` x ``size`` grey pixels) and the split record."""

    images: list[CXRImage]
    pixels: np.ndarray
    """``(n, size, size)`` uint8: the node's lung crop (``crop`` ``lung``) or the whole
    image (``none``), resized (area) to the model's input."""
    crop: str = "none"
    lung_model: str = ""
    """``name version`` of the lung model that made the crops (empty for ``none``)."""
    lung_model_sha256: str = ""
    sources: tuple[str, ...] = SOURCES
    duplicates_dropped: int = 0
    label_conflicts: int = 0
    merged_groups: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, labels)`` of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise TrainingError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        index = [i for i, image in enumerate(self.images) if image.split == name]
        labels = np.array([self.images[i].label for i in index], dtype=np.int64)
        return self.pixels[index], labels

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, for the model card."""
        table: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            labels = [image.label for image in self.images if image.split == split]
            table[split] = {name: labels.count(i) for i, name in enumerate(CLASS_NAMES)}
        return table

    def describe(self) -> str:
        """The split, class counts and de-duplication as Markdown for the model card."""
        classes = self.class_counts()
        lines = [
            "| split | groups | images | " + " | ".join(CLASS_NAMES) + " |",
            "|---|---:|---:|" + "---:|" * len(CLASS_NAMES),
        ]
        for split in SPLITS:
            row = self.counts[split]
            per_class = " | ".join(str(classes[split][name]) for name in CLASS_NAMES)
            lines.append(f"| {split} | {row['groups']} | {row['images']} | {per_class} |")
        lines.append("")
        lines.append(
            f"Near-duplicates (32 x 32 thumbnail correlation >= {DUPLICATE_CORRELATION}) "
            f"across all sources: {self.duplicates_dropped} copies dropped, "
            f"{self.label_conflicts} of them labelled differently from the kept image, "
            f"{self.merged_groups} group merges; splits are by merged group "
            f"(salt `{CXR_SALT}`, SHA-256 rank, stratified by source and class)."
        )
        lines.append("")
        lines.append(
            f"Input: the node's lung crop, made by the CXR pipeline's own code with "
            f"`{self.lung_model}` (mask, two largest components, extent relaxed by 5 % per "
            "side, cut from the source image, resized)."
            if self.crop == "lung"
            else "Input: the whole image resized to the model's input (no lung crop)."
        )
        return "\n".join(lines)


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise TrainingError(f"labels file not found: {str(path)!r}")
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _source_images(data_root: Path, sources: Sequence[str]) -> list[CXRImage]:
    images: list[CXRImage] = []
    root = data_root / CXR_DIR
    if "ieee8023" in sources:
        images += _ieee_images(root / IEEE_DIR)
    if "3class" in sources:
        images += _three_class_images(root / THREE_CLASS_DIR)
    if "nlm" in sources:
        images += _nlm_normal_images(data_root / NLM_DIR)
    return images


def _ieee_images(ieee: Path) -> list[CXRImage]:
    images = []
    for row in _read_rows(ieee / "labels.csv"):
        label = row["label"]
        if label not in IEEE_LABELS:
            raise TrainingError(f"{IEEE_DIR}/labels.csv: unknown label {label!r}")
        images.append(
            CXRImage(
                path=ieee / "images" / row["filename"],
                source="ieee8023",
                source_label=label,
                label=CLASS_NAMES.index(IEEE_LABELS[label]),
                group=f"ieee8023:{row['patientid']}",
            )
        )
    return images


def _three_class_images(three: Path) -> list[CXRImage]:
    images = []
    for row in _read_rows(three / "labels.csv"):
        label = row["label"]
        if label not in THREE_CLASS_LABELS:
            raise TrainingError(f"{THREE_CLASS_DIR}/labels.csv: unknown label {label!r}")
        images.append(
            CXRImage(
                path=three / row["path"],
                source="3class",
                source_label=label,
                label=CLASS_NAMES.index(THREE_CLASS_LABELS[label]),
                group=f"3class:{row['path']}",
            )
        )
    return images


def _nlm_normal_images(nlm: Path) -> list[CXRImage]:
    """The NLM sets' normal radiographs (one per patient: each is its own group)."""
    images = []
    for row in _read_rows(nlm / "pairs.csv"):
        if row["tb_label"] not in ("normal", "tuberculosis"):
            raise TrainingError(f"{NLM_DIR}/pairs.csv: unknown tb_label {row['tb_label']!r}")
        if row["tb_label"] == "normal":
            images.append(
                CXRImage(
                    path=nlm / "images" / row["filename"],
                    source="nlm",
                    source_label="normal",
                    label=CLASS_NAMES.index("normal"),
                    group=f"nlm:{row['filename']}",
                )
            )
    return images


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """The z-scored ``THUMBNAIL_SIZE`` square thumbnail used to find near-duplicates."""
    small = resize(grey, THUMBNAIL_SIZE).astype(np.float64).ravel()
    return (small - small.mean()) / (small.std() + 1e-6)


class _UnionFind:
    """Disjoint sets of hashable items; ``union(a, b)`` keeps ``a``'s root as the root."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, item: Any) -> Any:
        """The root of ``item``'s set."""
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: Any, b: Any) -> bool:
        """Join ``b``'s set into ``a``'s; True when they were apart."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True


def duplicate_sets(thumbnails: np.ndarray, threshold: float = DUPLICATE_CORRELATION) -> list[int]:
    """Union-find over thumbnail correlation: the root index of each image's duplicate set."""
    sets = _UnionFind()
    correlation = thumbnails @ thumbnails.T / thumbnails.shape[1]
    for i, j in zip(*np.nonzero(np.triu(correlation >= threshold, k=1)), strict=True):
        low, high = sorted((sets.find(int(i)), sets.find(int(j))))
        sets.union(low, high)  # the lowest index is each set's root
    return [sets.find(i) for i in range(len(thumbnails))]


def load_cxr_set(
    data_dir: Path,
    size: int,
    fractions: Sequence[float] = CXR_FRACTIONS,
    salt: str = CXR_SALT,
    crop: str = "none",
    lung_model: Path = DEFAULT_LUNG_MODEL,
    sources: Sequence[str] = SOURCES,
) -> CXRSet:
    """Read the ``sources``, merge near-duplicates, split by group; pixels at ``size``:
    the node's lung crop (``crop="lung"``, see :func:`lung_crops`) or the whole image
    (``"none"``). Adding a source leaves the other sources' splits as they were (groups
    are split per stratum of source and class)."""
    if crop not in CROPS:
        raise TrainingError(f"unknown crop {crop!r}; use one of {', '.join(CROPS)}")
    unknown = [name for name in sources if name not in SOURCES]
    if unknown or not sources:
        raise TrainingError(f"unknown CXR sources {list(sources)!r}; use some of {SOURCES}")
    data_root = Path(data_dir)
    root = data_root / CXR_DIR
    if not root.is_dir():
        raise TrainingError(
            f"CXR classification data not found: {str(root)!r} (give the data root with --data)"
        )
    images = _source_images(data_root, sources)
    pixels, thumbs, greys = [], [], []
    for image in images:
        grey = read_grey(image.path)
        thumbs.append(thumbnail(grey))
        pixels.append(resize(grey, size))
        greys.append(grey if crop == "lung" else None)
    members: dict[int, list[int]] = {}
    for index, root_index in enumerate(duplicate_sets(np.stack(thumbs))):
        members.setdefault(root_index, []).append(index)
    groups = _UnionFind()
    keep: list[int] = []
    dropped = conflicts = merged = 0
    for indices in members.values():
        # The ieee8023 original first (metadata, full resolution), then by path.
        ordered = sorted(
            indices, key=lambda i: (images[i].source != "ieee8023", str(images[i].path))
        )
        kept = ordered[0]
        keep.append(kept)
        dropped += len(ordered) - 1
        conflicts += sum(images[i].label != images[kept].label for i in ordered[1:])
        for i in ordered[1:]:
            joined = groups.union(images[kept].group, images[i].group)
            # Only patient groups count: a dropped 3-class copy's own group just vanishes.
            merged += joined and images[i].source == images[kept].source == "ieee8023"
    keep.sort()
    kept_images = [images[i] for i in keep]
    for image in kept_images:
        image.group = groups.find(image.group)
    strata: dict[str, tuple[str, int]] = {}
    for image in kept_images:
        strata.setdefault(image.group, (image.source, image.label))
    assignment = split_groups(strata.keys(), salt, fractions, strata)
    for image in kept_images:
        image.split = assignment[image.group]
    group_keys = [image.group for image in kept_images]
    splits = [image.split for image in kept_images]
    assert_group_disjoint(group_keys, splits)
    lung_name = lung_sha = ""
    if crop == "lung":
        kept_pixels, lung_spec = lung_crops(
            cast(list[np.ndarray], [greys[i] for i in keep]),
            [str(images[i].path.relative_to(data_root)) for i in keep],
            size,
            lung_model,
        )
        lung_name, lung_sha = f"{lung_spec.name} {lung_spec.version}", lung_spec.sha256
    else:
        kept_pixels = np.stack([pixels[i] for i in keep])
    return CXRSet(
        images=kept_images,
        pixels=kept_pixels,
        crop=crop,
        lung_model=lung_name,
        lung_model_sha256=lung_sha,
        sources=tuple(sources),
        duplicates_dropped=dropped,
        label_conflicts=conflicts,
        merged_groups=merged,
        counts=split_counts(splits, group_keys),
    )


def lung_crops(
    images: Sequence[np.ndarray],
    keys: Sequence[str],
    size: int,
    lung_model: Path = DEFAULT_LUNG_MODEL,
    cache_dir: Path | None = CROP_CACHE,
    batch_size: int = 16,
) -> tuple[np.ndarray, Any]:
    """The node's lung crops of grey ``uint8`` ``images``: ``((n, size, size), spec)``.

    Exactly the CXR pipeline's path (:func:`dicomnode.pipelines.cxr.lung_masks` then
    :func:`dicomnode.pipelines.cxr.lung_crop`) with the lung model in ``lung_model``
    (its checksum verified). Crops are cached in ``cache_dir`` per lung-model SHA-256
    and size under ``keys`` (one unique key per image, e.g. its path); ``None``
    disables the cache.
    """
    from dicomnode.inference.lung import lung_crop, lung_masks
    from dicomnode.inference.registry import load_model, read_manifest

    spec = read_manifest(Path(lung_model) / "manifest.toml")
    cache: dict[str, np.ndarray] = {}
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{spec.sha256[:16]}-{size}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as stored:
                cache = dict(zip(stored["keys"].tolist(), stored["crops"], strict=True))
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        model = load_model(spec)

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))

        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            masks = lung_masks([images[i] for i in chunk], spec, predict)
            for i, mask in zip(chunk, masks, strict=True):
                cache[keys[i]] = lung_crop(images[i], mask, size)[1]
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.stem}.tmp.npz")
            np.savez_compressed(
                tmp, keys=np.array(list(cache)), crops=np.stack(list(cache.values()))
            )
            tmp.replace(cache_file)
    return np.stack([cache[key] for key in keys]), spec


def to_model_input(pixels: np.ndarray, channels: int = 3, scale: float = 1 / 255) -> np.ndarray:
    """Grey ``uint8`` images ``(n, h, w)`` -> float32 ``(n, h, w, channels)`` times ``scale``.

    The node does the same to its lung crops (grey repeated, scaled by the manifest's
    ``scale``, 1/255 as the seed).
    """
    values = pixels.astype(np.float32)[..., None] * np.float32(scale)
    return np.repeat(values, channels, axis=-1)


__all__ = [
    "CLASS_NAMES",
    "CROPS",
    "CXR_CLASSES",
    "CXR_FRACTIONS",
    "CXR_SALT",
    "DUPLICATE_CORRELATION",
    "LEGACY_SOURCES",
    "SOURCES",
    "CXRImage",
    "CXRSet",
    "duplicate_sets",
    "load_cxr_set",
    "lung_crops",
    "thumbnail",
    "to_model_input",
]
