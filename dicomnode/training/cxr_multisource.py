"""One assembled chest X-ray set over every CXR folder of the data root, with provenance.

Every image of every labelled CXR folder is read once and given a record
(:class:`SourceImage`): the folder it came from, the **source** (the hospital or
collection whose habits are in its pixels), the patient, the view, the age group, the
licence, the label as the folder gives it and the class this set maps it to. Then:

1. **Content de-duplication.** Each image gets a 64-bit DCT perceptual hash
   (:func:`phash`: 32 x 32 area-resized grey, 2-D DCT, the 8 x 8 lowest frequencies less
   the DC term against their median). Two images whose hashes differ in at most
   :data:`DUPLICATE_HAMMING` bits are one picture (a resized, re-encoded or squashed
   copy) **if** their z-scored 32 x 32 thumbnails also correlate at
   :data:`DUPLICATE_CORRELATION` or more. Chest films are alike at low frequencies (on
   this data distinct Kermany children are often 8-12 bits apart), so the hash only
   proposes pairs and the thumbnail confirms them (every confirmed copy pair measured
   here correlates at 0.97 or more); copies are merged by union-find. Of each set the
   record of the most authoritative folder is kept (:data:`FOLDER_PRIORITY`: the folders
   with patient ids and upstream metadata first, the Kaggle 3-class copies last).
2. **Label conflicts, resolved explicitly.** When the kept copies of one picture carry
   different classes the picture is dropped (reason ``label conflict``) unless the
   disagreement is only a lower-priority copy's (the Kaggle set relabels some ieee8023
   SARS and bacterial images "Covid"): then the kept record's label stands and the
   override is reported.
3. **Patients.** A group is a patient of a source (``source:patient``); the groups of all
   copies of one picture are merged, so no patient and no picture can reach two splits.
   Images with no patient id (the Kaggle copies that match no original) are dropped: a
   patient-level split cannot place them, and their patient may have other images here.
4. **Classes.** ``pneumonia`` (every non-COVID-19 pneumonia, bacterial or viral or
   unspecified), ``covid19`` and ``normal``, in the other members' output order; the
   pneumonia subtype (``bacterial`` / ``viral`` / ``""``) is kept per image for the
   within-Kermany bacterial-vs-viral analysis. Labels outside these (tuberculosis, the
   NIH box set's other findings, ieee8023 ``other``) are dropped with their reason.
5. **Splits** by group, stratified by source and the group's classes, with
   :func:`dicomnode.training.data.split_groups` (train / val / held-out test).

:func:`assemble` returns the :class:`Assembly` (kept images, dropped images with reasons,
conflict log) and :func:`report_markdown` writes what was dropped and why.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dicomnode.training import TrainingError
from dicomnode.training.data import assert_group_disjoint, read_grey, split_groups

#: The classes, in model output order (the order of the seed members' outputs).
CLASSES = ("pneumonia", "covid19", "normal")
#: Hashes this many bits apart or closer are candidate copies ...
DUPLICATE_HAMMING = 16
#: ... confirmed when their z-scored thumbnails correlate at least this much.
DUPLICATE_CORRELATION = 0.97
#: Default split fractions and salt.
FRACTIONS = (0.6, 0.2, 0.2)
SALT = "cxr-multisource-v1"

MULTISOURCE = "cxr_multisource"
IEEE_SUBSET = "cxr_classification/ieee8023_covid_chestxray_subset"
KAGGLE_3CLASS = "cxr_classification/covid19_image_dataset_3class_640px"
NLM = "cxr_lung_masks/montgomery_shenzhen_512px"
NIH_BOXES = "cxr_opacity_boxes/nih_cxr14_bbox"
#: Folders in the order their record wins for duplicated pictures.
FOLDER_PRIORITY = (MULTISOURCE, IEEE_SUBSET, NIH_BOXES, NLM, KAGGLE_3CLASS)

#: Folder label -> (class, pneumonia subtype); a label absent here is not modelled.
_LABELS: dict[str, tuple[str, str]] = {
    "normal": ("normal", ""),
    "pneumonia": ("pneumonia", ""),
    "bacterial": ("pneumonia", "bacterial"),
    "viral": ("pneumonia", "viral"),
    "viral_non_covid": ("pneumonia", "viral"),
    "viral_pneumonia": ("pneumonia", "viral"),
    "covid19": ("covid19", ""),
}


@dataclass
class SourceImage:
    """One image file and what is known of it."""

    path: Path
    folder: str
    source: str
    patient: str  # "" when unknown
    source_label: str
    view: str
    age_group: str  # "child", "adult" or ""
    licence: str
    label: str = ""  # one of CLASSES, "" when not modelled
    subtype: str = ""  # "bacterial", "viral" or ""
    phash: int = 0
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    group: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        self.label, self.subtype = _LABELS.get(self.source_label, ("", ""))


@dataclass
class Dropped:
    """An image left out, and why."""

    image: SourceImage
    reason: str
    kept_copy: str = ""  # path of the record kept instead, for duplicates


@dataclass
class Assembly:
    """The kept images (split), the dropped ones and the label decisions."""

    images: list[SourceImage]
    dropped: list[Dropped] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def class_index(self) -> np.ndarray:
        return np.array([CLASSES.index(i.label) for i in self.images], dtype=np.int64)


# --------------------------------------------------------------------- perceptual hash


def phash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grey image (any size and aspect ratio)."""
    if grey.ndim != 2 or grey.size == 0:
        raise TrainingError(f"phash needs a 2-D image, got shape {grey.shape}")
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()[1:]
    bits = low > np.median(low)
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """The z-scored 32 x 32 (area-resized) grey thumbnail, flattened (1,024 values)."""
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA).ravel()
    return (small - small.mean()) / (float(small.std()) + 1e-6)


def hamming_matrix(hashes: Sequence[int]) -> np.ndarray:
    """``(n, n)`` pairwise Hamming distances of 64-bit hashes."""
    bits = np.array([[(h >> i) & 1 for i in range(64)] for h in hashes], dtype=np.float32)
    signed = 2 * bits - 1
    return np.rint((64 - signed @ signed.T) / 2).astype(np.int64)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_clusters(
    hashes: Sequence[int],
    thumbnails: np.ndarray,
    max_distance: int = DUPLICATE_HAMMING,
    min_correlation: float = DUPLICATE_CORRELATION,
) -> list[int]:
    """Cluster root per image: hashes within ``max_distance`` bits whose thumbnails
    correlate at ``min_correlation`` or more are one picture (transitively)."""
    n = len(hashes)
    found = _UnionFind(n)
    if n:
        distances = hamming_matrix(hashes)
        for a, b in zip(*np.nonzero(np.triu(distances <= max_distance, k=1)), strict=True):
            if float(np.mean(thumbnails[a] * thumbnails[b])) >= min_correlation:
                found.union(int(a), int(b))
    return [found.find(i) for i in range(n)]


# --------------------------------------------------------------------- folder readers


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _age_group(age: str, default: str) -> str:
    try:
        return "child" if float(age) < 18 else "adult"
    except ValueError:
        return default


def read_multisource(root: Path) -> list[SourceImage]:
    folder = root / MULTISOURCE
    out = []
    for row in _rows(folder / "labels.csv"):
        source = row["source"]
        default_age = "child" if source == "kermany_pediatric" else "adult"
        if source == "ieee8023_covid_chestxray":
            default_age = ""
        age = "child" if row["age"] == "child" else _age_group(row["age"], default_age)
        out.append(
            SourceImage(
                folder / row["path"],
                MULTISOURCE,
                source,
                row["patient_id"],
                row["label"],
                row["view"] or "frontal",
                age,
                row["licence"],
            )
        )
    return out


def read_ieee_subset(root: Path) -> list[SourceImage]:
    folder = root / IEEE_SUBSET
    out = []
    for row in _rows(folder / "labels.csv"):
        hannover = row["location"].startswith("Hannover")
        source = "hannover_covid19" if hannover else "ieee8023_covid_chestxray"
        out.append(
            SourceImage(
                folder / "images" / row["filename"],
                IEEE_SUBSET,
                source,
                f"ieee{row['patientid']}",
                row["label"],
                row["view"],
                _age_group(row["age"], ""),
                row["license"] or "unspecified",
            )
        )
    return out


def read_kaggle_3class(root: Path) -> list[SourceImage]:
    folder = root / KAGGLE_3CLASS
    out = []
    for row in _rows(folder / "labels.csv"):
        covid = row["label"] == "covid19"
        out.append(
            SourceImage(
                folder / row["path"],
                KAGGLE_3CLASS,
                "ieee8023_covid_chestxray" if covid else "kermany_pediatric",
                "",
                row["label"],
                "frontal",
                "" if covid else "child",
                "unclear (Kaggle CC BY-SA 4.0 claimed)",
            )
        )
    return out


def read_nlm(root: Path) -> list[SourceImage]:
    folder = root / NLM
    out = []
    for row in _rows(folder / "pairs.csv"):
        stem = Path(row["filename"]).stem
        out.append(
            SourceImage(
                folder / "images" / row["filename"],
                NLM,
                f"nlm_{row['source']}",
                stem,
                row["tb_label"],
                "PA",
                "adult",
                "NLM (research use; not redistributable)",
            )
        )
    return out


def read_nih_boxes(root: Path) -> list[SourceImage]:
    folder = root / NIH_BOXES
    pneumonia: dict[str, bool] = {}
    for row in _rows(folder / "labels_rsna_format.csv"):
        pneumonia[row["patientId"]] = pneumonia.get(row["patientId"], False) or row["Target"] == "1"
    out = []
    for stem, has_box in sorted(pneumonia.items()):
        out.append(
            SourceImage(
                folder / "images" / f"{stem}.png",
                NIH_BOXES,
                "nih_cxr14",
                stem.split("_")[0],
                "pneumonia" if has_box else "other_boxed_finding",
                "frontal",
                "adult",
                "CC0 (NIH Clinical Center)",
            )
        )
    return out


_READERS = {
    MULTISOURCE: read_multisource,
    IEEE_SUBSET: read_ieee_subset,
    NIH_BOXES: read_nih_boxes,
    NLM: read_nlm,
    KAGGLE_3CLASS: read_kaggle_3class,
}


def read_folders(root: Path) -> list[SourceImage]:
    """Every record of every CXR folder present under ``root`` (absent folders skipped)."""
    images: list[SourceImage] = []
    for folder in FOLDER_PRIORITY:
        if (root / folder).is_dir():
            images.extend(_READERS[folder](root))
    if not images:
        raise TrainingError(f"no CXR folder found under {str(root)!r}")
    return images


# --------------------------------------------------------------------- assembly


def assemble(
    images: list[SourceImage],
    *,
    hashes: Sequence[int] | None = None,
    thumbnails: np.ndarray | None = None,
    fractions: Sequence[float] = FRACTIONS,
    salt: str = SALT,
    max_distance: int = DUPLICATE_HAMMING,
) -> Assembly:
    """De-duplicate, resolve labels, group by patient and split ``images`` (see the module).

    ``hashes`` and ``thumbnails`` (one per image) skip reading the pixels; by default each
    file is read, hashed and reduced to its :func:`thumbnail`, and an unreadable file is
    dropped with its error.
    """
    dropped: list[Dropped] = []
    readable: list[SourceImage] = []
    if hashes is None:
        for image in images:
            try:
                grey = read_grey(image.path)
                image.phash = phash(grey)
                image.thumbnail = thumbnail(grey)
            except TrainingError as exc:
                dropped.append(Dropped(image, f"unreadable: {exc}"))
                continue
            readable.append(image)
    else:
        if thumbnails is None or not len(hashes) == len(thumbnails) == len(images):
            raise TrainingError(f"give one hash and one thumbnail for each of {len(images)} images")
        for image, value, thumb in zip(images, hashes, thumbnails, strict=True):
            image.phash = int(value)
            image.thumbnail = np.asarray(thumb, dtype=np.float32)
        readable = list(images)

    thumbs = np.array([i.thumbnail for i in readable], dtype=np.float32).reshape(len(readable), -1)
    roots = duplicate_clusters([i.phash for i in readable], thumbs, max_distance)
    clusters: dict[int, list[int]] = {}
    for index, root in enumerate(roots):
        clusters.setdefault(root, []).append(index)

    groups = _UnionFind(len(readable))
    kept_by_cluster: dict[int, int] = {}
    overrides: list[str] = []
    for root, members in clusters.items():
        ordered = sorted(members, key=lambda i: (FOLDER_PRIORITY.index(readable[i].folder), i))
        keeper = ordered[0]
        best_rank = FOLDER_PRIORITY.index(readable[keeper].folder)
        authoritative = {
            readable[i].label
            for i in ordered
            if FOLDER_PRIORITY.index(readable[i].folder) == best_rank
            or readable[i].folder != KAGGLE_3CLASS
        }
        for other in ordered[1:]:
            # Patients of every copy become one group (so a copy cannot leak a patient).
            if readable[other].patient:
                groups.union(keeper, other)
        if len(authoritative) > 1:
            labels = ", ".join(sorted(f"{readable[i].source_label}" for i in ordered))
            for i in ordered:
                dropped.append(Dropped(readable[i], f"label conflict between copies ({labels})"))
            continue
        for other in ordered[1:]:
            copy = readable[other]
            if copy.label != readable[keeper].label:
                overrides.append(
                    f"{copy.folder}/{copy.path.name}: label {copy.source_label!r} overridden by "
                    f"{readable[keeper].source_label!r} of {readable[keeper].path.name}"
                )
            dropped.append(Dropped(copy, "duplicate picture", str(readable[keeper].path)))
        kept_by_cluster[root] = keeper

    # Patient keys: copies merged above; the same source patient is one group.
    first_of_patient: dict[str, int] = {}
    for index, image in enumerate(readable):
        if image.patient:
            key = f"{image.source}:{image.patient}"
            groups.union(first_of_patient.setdefault(key, index), index)

    kept: list[SourceImage] = []
    for keeper in sorted(kept_by_cluster.values()):
        image = readable[keeper]
        if not image.patient:
            dropped.append(Dropped(image, "no patient id (matches no original)"))
            continue
        if not image.label:
            dropped.append(Dropped(image, f"label {image.source_label!r} is not a modelled class"))
            continue
        image.group = f"g{groups.find(keeper):05d}:{image.source}:{image.patient}"
        kept.append(image)
    # One name per union-find group: the smallest member key.
    canonical: dict[str, str] = {}
    for image in kept:
        group_root = image.group.split(":")[0]
        canonical[group_root] = min(canonical.get(group_root, image.group), image.group)
    for image in kept:
        image.group = canonical[image.group.split(":")[0]].split(":", 1)[1]

    strata: dict[str, str] = {}
    group_labels: dict[str, set[str]] = {}
    group_source: dict[str, str] = {}
    for image in kept:
        group_labels.setdefault(image.group, set()).add(image.label)
        group_source.setdefault(image.group, image.source)
    for group, classes in group_labels.items():
        strata[group] = f"{group_source[group]}|{'+'.join(sorted(classes))}"
    assignment = split_groups(strata, salt, fractions, strata)
    for image in kept:
        image.split = assignment[image.group]
    assert_group_disjoint([i.group for i in kept], [i.split for i in kept])
    return Assembly(kept, dropped, overrides)


# --------------------------------------------------------------------- report


def counts_table(images: Sequence[SourceImage]) -> list[tuple[str, str, int, int, int, int]]:
    """(source, class, train, val, test, patients) rows."""
    rows = []
    keys = sorted({(i.source, i.label) for i in images})
    for source, label in keys:
        chosen = [i for i in images if i.source == source and i.label == label]
        by_split = Counter(i.split for i in chosen)
        rows.append(
            (
                source,
                label,
                by_split["train"],
                by_split["val"],
                by_split["test"],
                len({i.group for i in chosen}),
            )
        )
    return rows


def report_markdown(assembly: Assembly) -> str:
    """What was kept (per source, class and split) and what was dropped, and why."""
    lines = ["# CXR multi-source assembly", ""]
    lines.append(
        f"Kept {len(assembly.images)} images of "
        f"{len({i.group for i in assembly.images})} patients; "
        f"dropped {len(assembly.dropped)}."
    )
    lines += ["", "| source | class | train | val | test | patients |", "|---|---|---|---|---|---|"]
    for row in counts_table(assembly.images):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    reasons = Counter(
        (d.image.folder, d.reason.split(":")[0].split(" (")[0]) for d in assembly.dropped
    )
    lines += ["", "## Dropped", "", "| folder | reason | images |", "|---|---|---|"]
    for (folder, reason), n in sorted(reasons.items()):
        lines.append(f"| {folder} | {reason} | {n} |")
    conflicts = [d for d in assembly.dropped if d.reason.startswith("label conflict")]
    if conflicts:
        lines += ["", "## Label conflicts (every copy dropped)", ""]
        lines += [f"- {d.image.folder}/{d.image.path.name}: {d.reason}" for d in conflicts]
    if assembly.overrides:
        lines += ["", "## Labels of lower-priority copies overridden", ""]
        lines += [f"- {text}" for text in assembly.overrides]
    return "\n".join(lines) + "\n"


def write_manifest(assembly: Assembly, path: Path, root: Path) -> None:
    """One CSV row per kept image (paths relative to ``root``) with its provenance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "path",
        "folder",
        "source",
        "patient",
        "group",
        "label",
        "subtype",
        "source_label",
        "view",
        "age_group",
        "licence",
        "phash",
        "split",
    ]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for i in assembly.images:
            writer.writerow(
                [
                    i.path.relative_to(root).as_posix(),
                    i.folder,
                    i.source,
                    i.patient,
                    i.group,
                    i.label,
                    i.subtype,
                    i.source_label,
                    i.view,
                    i.age_group,
                    i.licence,
                    f"{i.phash:016x}",
                    i.split,
                ]
            )
