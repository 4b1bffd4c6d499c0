"""``dicomnode train detector``: the opacity detector on radiologist boxes and image labels.

Input: a labels CSV in the RSNA Pneumonia Detection format
(``patientId,x,y,width,height,Target``; one row per box, or one row with empty box
columns and ``Target`` 0 for an image without opacity) and a folder of images named
``<patientId>.dcm`` (or ``.png``/``.jpg``): a site's own data works the same way. Only
labelled images found in the folder are used. Boxes are in source pixels. Optionally
(``--image-labels``) a CSV of image-level labels (``path,label[,patient_id][,source]``,
paths relative to the CSV): images labelled ``--negative-label`` are negatives
everywhere (an all-zero mask), images labelled ``--positive-label`` are weak positives
(only the image-level loss: some part of the map must be high).

Model (:mod:`dicomnode.nets.detector`): a frozen ImageNet MobileNetV2 encoder
(``--pretrained``, the slim ``.npy`` folder) and a small trained decoder giving an
opacity map at 1/8 of the input. The encoder is frozen, so its features are computed
once per image (and its mirror image: seed 003's horizontal flip) and cached in the
checkpoint folder; epochs then train the decoder only, which a 2-core CPU does in
minutes. Loss per image: for images with pixel labels (boxes, or negatives) 0.5 * BCE
+ 0.5 * IoU loss of the map against the boxes painted as a mask (seeds 002/003); for
every image the BCE of its image-level score (mean of the 8 highest map values)
against its label. Adam, cosine-annealed from ``--lr``; the best epoch by validation
image AUC plus RSNA score.

Splits by patient (``patient_of``: the NIH file prefix before ``_``, else the whole
``patientId``) over both label sources together, stratified by whether the patient has
a box, a weak label or neither; 60 / 15 / 25 % train / validation / test. The
post-processing (:class:`~dicomnode.inference.detector.BoxSettings`: threshold, gate,
minimum area, at most N boxes) is chosen on the validation patients by the RSNA score
and written to the manifest's ``[postprocess]``; the test patients are measured once,
by :func:`evaluate_detector` (also ``dicomnode evaluate``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
import sys
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.training import (
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    Target,
    TrainingError,
    checkpoint_dir,
    register,
)
from dicomnode.training import data as tdata

NAME = "cxr-opacity-detector"
VERSION = "2.0.0"
SALT = "dicomnode-detector-v2"
FRACTIONS = (0.60, 0.15, 0.25)
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
BOX_DATA = DEFAULT_DATA_DIR / "cxr_opacity_boxes" / "nih_cxr14_bbox"
IMAGE_LABELS = DEFAULT_DATA_DIR / "cxr_multisource" / "labels.csv"
PRETRAINED = DEFAULT_DATA_DIR / "pretrained" / "mobilenet_v2_imagenet"
DEFAULTS: dict[str, Any] = {
    "input_size": 256,
    "channels": 64,
    "epochs": 30,
    "batch_size": 32,
    "lr": 1e-3,
    "image_weight": 1.0,
}
TOP_K = 8
_NIH_INDEX = re.compile(r"^(\d{8})_\d{3}$")
#: The post-processing grid searched on the validation patients.
GRID: dict[str, Sequence[Any]] = {
    "threshold": (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6),
    "gate": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "min_area": (0.005, 0.01, 0.02, 0.04),
    "max_boxes": (1, 2, 3),
}
#: The smaller grid searched after every epoch (the validation score of the epoch).
EPOCH_GRID: dict[str, Sequence[Any]] = {
    "threshold": (0.4, 0.5, 0.6),
    "gate": (0.5, 0.7, 0.9),
    "min_area": (0.01,),
    "max_boxes": (1, 2),
}
#: The epoch's validation score: RSNA score (best of EPOCH_GRID) + this x image AUC.
AUC_SHARE = 0.25


@dataclass
class DetectorCase:
    """One image: its id, file, boxes (x, y, width, height) in source pixels, whether
    it shows an opacity (``label``) and whether only that label is known (``weak``)."""

    patient_id: str
    image: Path
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    label: int = 0
    weak: bool = False

    @property
    def group(self) -> str:
        """The patient, for the splits."""
        return patient_of(self.patient_id)


def patient_of(image_id: str) -> str:
    """The patient of an image id: the NIH ChestX-ray14 patient number for an NIH
    ``Image Index`` (``00000150_002`` -> ``00000150``), else the id itself (RSNA)."""
    match = _NIH_INDEX.match(image_id)
    return match.group(1) if match else image_id


def read_labels(labels: Path, images: Path) -> list[DetectorCase]:
    """The labelled images in ``images``, with their boxes (RSNA label format)."""
    labels, images = Path(labels), Path(images)
    if not labels.is_file():
        raise TrainingError(f"labels file not found: {str(labels)!r} (give it with --labels)")
    if not images.is_dir():
        raise TrainingError(f"image folder not found: {str(images)!r} (give it with --images)")
    found = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    by_patient: dict[str, DetectorCase] = {}
    with labels.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        need = {"patientId", "x", "y", "width", "height", "Target"}
        if not need <= set(reader.fieldnames or ()):
            raise TrainingError(
                f"{str(labels)!r}: columns must include {sorted(need)}, got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            pid = row["patientId"]
            if pid not in found:
                continue
            case = by_patient.setdefault(pid, DetectorCase(pid, found[pid]))
            if row["Target"].strip() == "1":
                try:
                    box = tuple(float(row[k]) for k in ("x", "y", "width", "height"))
                except ValueError:
                    raise TrainingError(
                        f"{str(labels)!r} line {line}: bad box {[row[k] for k in need]!r}"
                    ) from None
                case.boxes.append(box)  # type: ignore[arg-type]
                case.label = 1
    if not by_patient:
        raise TrainingError(
            f"no image in {str(images)!r} matches a patientId of {str(labels)!r} "
            f"(expected files named <patientId>{'|'.join(IMAGE_SUFFIXES)})"
        )
    return [by_patient[k] for k in sorted(by_patient)]


def read_image_labels(
    path: Path, negative: str, positive: str, source: str | None = None
) -> list[DetectorCase]:
    """Image-level cases from a ``path,label[,patient_id][,source]`` CSV: ``negative``
    images as pixel-level negatives, ``positive`` ones as weak positives; other labels
    and other sources are left out. Image ids are the file stems."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"image labels not found: {str(path)!r} (--image-labels)")
    cases = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise TrainingError(f"{str(path)!r}: columns must include path and label")
        for row in reader:
            if source is not None and row.get("source") != source:
                continue
            if row["label"] not in (negative, positive):
                continue
            image = path.parent / row["path"]
            if not image.is_file():
                raise TrainingError(f"{str(path)!r}: image {row['path']!r} not found")
            is_positive = row["label"] == positive
            cases.append(DetectorCase(image.stem, image, [], int(is_positive), is_positive))
    return cases


def combine_cases(boxed: list[DetectorCase], weak: list[DetectorCase]) -> list[DetectorCase]:
    """Both sources, an image with boxes replacing its image-level copy."""
    known = {c.patient_id for c in boxed}
    return boxed + [c for c in weak if c.patient_id not in known]


def _stratum(cases: Sequence[DetectorCase]) -> str:
    if any(c.boxes for c in cases):
        return "boxes"
    return "weak" if any(c.label for c in cases) else "negative"


def assign_splits(items: list[DetectorCase], salt: str = SALT) -> list[str]:
    """The split of each image: by patient, stratified by the patient's labels."""
    by_group: dict[str, list[DetectorCase]] = {}
    for c in items:
        by_group.setdefault(c.group, []).append(c)
    strata: dict[str, Hashable] = {g: _stratum(cs) for g, cs in by_group.items()}
    split_of = tdata.split_groups(strata, salt, FRACTIONS, strata=strata)
    splits = [split_of[c.group] for c in items]
    tdata.assert_group_disjoint([c.group for c in items], splits)
    return splits


def box_mask(
    boxes: Sequence[tuple[float, float, float, float]], rows: int, cols: int, size: int
) -> np.ndarray:
    """The boxes painted at ``size`` x ``size`` (float32, 1 inside a box)."""
    mask = np.zeros((size, size), np.float32)
    for x, y, w, h in boxes:
        x0, y0 = round(x * size / cols), round(y * size / rows)
        x1, y1 = round((x + w) * size / cols), round((y + h) * size / rows)
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1
    return mask


def load_case(case: DetectorCase, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The grey image resized (``INTER_AREA``) to ``size``, its box mask at ``size``
    and the source (rows, columns)."""
    grey = tdata.read_grey(case.image)
    rows, cols = grey.shape
    return tdata.resize(grey, size), box_mask(case.boxes, rows, cols, size), (rows, cols)


def targets_at(mask: np.ndarray, case: DetectorCase, out: int) -> np.ndarray:
    """The training target at the map size: (mask share per cell, pixel-labelled flag,
    image label) as three channels."""
    import cv2

    small = cv2.resize(mask, (out, out), interpolation=cv2.INTER_AREA)
    y = np.zeros((out, out, 3), np.float32)
    y[..., 0] = small
    y[..., 1] = 0.0 if case.weak else 1.0
    y[..., 2] = float(case.label)
    return y


def detector_loss(y_true: Any, y_pred: Any) -> Any:
    """Per image: [pixel-labelled] (0.5 BCE + 0.5 IoU loss of the map) + BCE of the
    image score (mean of the :data:`TOP_K` highest map values) against the label."""
    from keras import ops

    eps = 1e-6
    p = ops.clip(y_pred[..., 0], eps, 1 - eps)
    mask, pixel, label = y_true[..., 0], y_true[:, 0, 0, 1], y_true[:, 0, 0, 2]
    bce = -ops.mean(mask * ops.log(p) + (1 - mask) * ops.log(1 - p), axis=(1, 2))
    inter = ops.sum(mask * p, axis=(1, 2))
    union = ops.sum(mask, axis=(1, 2)) + ops.sum(p, axis=(1, 2)) - inter
    iou_loss = 1 - (inter + 1.0) / (union + 1.0)
    flat = ops.reshape(p, (ops.shape(p)[0], -1))
    score = ops.clip(ops.mean(ops.top_k(flat, TOP_K)[0], axis=1), eps, 1 - eps)
    image = -(label * ops.log(score) + (1 - label) * ops.log(1 - score))
    return ops.mean(pixel * (0.5 * bce + 0.5 * iou_loss) + image)


# ----------------------------------------------------------------------- measuring


def lung_model(models_dir: Path) -> tuple[Any, Any]:
    """The shipped lung U-Net (spec, model): the node's own lung step."""
    from dicomnode.inference.registry import load_model, read_manifest

    spec = read_manifest(Path(models_dir) / "cxr-lung-unet" / "manifest.toml")
    return spec, load_model(spec)


def lungs_of(images: Sequence[np.ndarray], spec: Any, model: Any) -> list[np.ndarray]:
    """Lung masks (at the U-Net's size) of grey images, as the pipeline computes them."""
    from dicomnode.inference.lung import lung_masks
    from dicomnode.training.loop import predict

    return lung_masks(list(images), spec, lambda x: predict(model, x))


def predictions(
    maps: Sequence[np.ndarray] | np.ndarray,
    lungs: Sequence[np.ndarray],
    shapes: Sequence[tuple[int, int]],
    settings: Any,
    gated: bool = True,
    work: int | None = None,
) -> list[list[tuple[tuple[float, float, float, float], float]]]:
    """The boxes (in source pixels) of detector ``maps``: post-processed at the source
    size, or at ``work`` x ``work`` and scaled (for the quick validation search)."""
    from dicomnode.inference.detector import boxes_in_lungs, source_lungs
    from dicomnode.inference.geometry import resize_map

    out = []
    for prob, lung, (rows, cols) in zip(maps, lungs, shapes, strict=True):
        h, w = (work, work) if work else (rows, cols)
        boxes = boxes_in_lungs(
            resize_map(prob, w, h), source_lungs(lung, h, w), settings, gated=gated
        )
        sx, sy = cols / w, rows / h
        out.append(
            [
                ((b.x * sx, b.y * sy, b.width * sx, b.height * sy), float(b.confidence or 0.0))
                for b in boxes
            ]
        )
    return out


def choose_postprocess(
    maps: Sequence[np.ndarray] | np.ndarray,
    lungs: Sequence[np.ndarray],
    cases: Sequence[DetectorCase],
    shapes: Sequence[tuple[int, int]],
    grid: dict[str, Sequence[Any]] | None = None,
) -> tuple[Any, float]:
    """The ``grid`` (default :data:`GRID`) settings with the best RSNA score on these
    (validation) images that have box labels (weak positives have no box truth)."""
    grid = grid or GRID
    from dicomnode.inference.detector import BoxSettings
    from dicomnode.training.box_metrics import ImageBoxes, rsna_score

    keep = [i for i, c in enumerate(cases) if not c.weak]
    best: tuple[float, Any] = (-1.0, BoxSettings())
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = BoxSettings(top_k=TOP_K, **dict(zip(keys, values, strict=True)))
        preds = predictions(
            [maps[i] for i in keep],
            [lungs[i] for i in keep],
            [shapes[i] for i in keep],
            settings,
            work=128,
        )
        score = rsna_score(
            [ImageBoxes(cases[i].boxes, p) for i, p in zip(keep, preds, strict=True)]
        )
        if score > best[0]:
            best = (score, settings)
    return best[1], best[0]


def measure(model_dir: Path, cases: list[DetectorCase], splits: list[str]) -> dict[str, Any]:
    """Every metric of the issue on the test patients, through the node's own steps
    (detector input, lung U-Net, post-processing at the source size)."""
    from dicomnode.inference.detector import BoxSettings, detector_input, image_score
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training import box_metrics as bm
    from dicomnode.training import metrics as m
    from dicomnode.training.export import MANIFEST_FILE
    from dicomnode.training.loop import predict

    spec = read_manifest(Path(model_dir) / MANIFEST_FILE)
    settings = BoxSettings.from_table(spec.postprocess)
    test = [c for c, s in zip(cases, splits, strict=True) if s == "test"]
    if not test:
        raise TrainingError("the test split is empty: too few labelled images")
    greys = [tdata.read_grey(c.image) for c in test]
    shapes = [g.shape for g in greys]
    maps = predict(load_model(spec), detector_input(greys, spec))[..., 0]
    lspec, lmodel = lung_model(REPO_ROOT / "models")
    lungs = lungs_of(greys, lspec, lmodel)
    preds = predictions(maps, lungs, shapes, settings)
    ungated = predictions(maps, lungs, shapes, settings.with_(max_boxes=10), gated=False)
    labels = np.array([c.label for c in test], np.int64)
    boxed = [i for i, c in enumerate(test) if not c.weak]
    images = [bm.ImageBoxes(c.boxes, p) for c, p in zip(test, preds, strict=True)]
    top = np.array([max((c for _, c in p), default=0.0) for p in preds])
    top_ungated = np.array([max((c for _, c in p), default=0.0) for p in ungated])
    scores = np.array([image_score(mp, settings.top_k) for mp in maps])

    def rsna(idx: np.ndarray) -> float:
        return bm.rsna_score([images[i] for i in idx if not test[i].weak])

    def sens(idx: np.ndarray) -> float:
        return bm.box_sensitivity([images[i] for i in idx if not test[i].weak])

    def fpn(idx: np.ndarray) -> float:
        return bm.false_boxes_per_negative([images[i] for i in idx if not test[i].weak])

    statistics = {
        "rsna_score": rsna,
        "image_auc": lambda idx: m.roc_auc(labels[idx], top[idx]),
        "image_auc_ungated": lambda idx: m.roc_auc(labels[idx], top_ungated[idx]),
        "image_auc_score": lambda idx: m.roc_auc(labels[idx], scores[idx]),
        "box_sensitivity_iou40": sens,
        "false_boxes_per_negative": fpn,
    }
    everyone = np.arange(len(test))
    resamples = m.bootstrap_resamples(labels, 1000, seed=0)
    result: dict[str, Any] = {}
    for key, fn in statistics.items():
        values = np.array([fn(idx) for idx in resamples], np.float64)
        values = values[~np.isnan(values)]
        result[key] = float(fn(everyone))
        result[f"{key}_ci95"] = [
            float(np.percentile(values, 2.5)),
            float(np.percentile(values, 97.5)),
        ]
    result["rsna_images_scored"] = sum(bm.rsna_image_score(images[i]) is not None for i in boxed)
    result["n"] = len(test)
    result["n_with_boxes"] = sum(bool(c.boxes) for c in test)
    result["n_weak_positive"] = sum(c.weak for c in test)
    result["n_negative"] = int((labels == 0).sum())
    result["true_boxes"] = sum(len(c.boxes) for c in test)
    result["postprocess"] = settings.as_table()
    froc_x, froc_y = bm.froc([bm.ImageBoxes(test[i].boxes, ungated[i]) for i in boxed])
    return {
        "metrics": result,
        "froc": (froc_x, froc_y),
        "test": test,
        "greys": greys,
        "preds": preds,
    }


def plot_froc(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    """The FROC curve as a PNG."""
    from dicomnode.training.card import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.step(x, y, where="post")
    ax.set_xlabel("false boxes per image")
    ax.set_ylabel("box sensitivity (IoU >= 0.4)")
    ax.set_ylim(0, 1)
    ax.set_title("FROC, test patients (ungated)")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_examples(
    test: Sequence[DetectorCase],
    greys: Sequence[np.ndarray],
    preds: Sequence[Sequence[tuple[tuple[float, float, float, float], float]]],
    path: Path,
    count: int = 12,
) -> Path:
    """A sheet of test images with true (green) and predicted (red, confidence) boxes:
    boxed positives first, then negatives, in file order."""
    from dicomnode.training.card import _pyplot, _save

    plt = _pyplot()
    order = [i for i, c in enumerate(test) if c.boxes][: count * 2 // 3]
    order += [i for i, c in enumerate(test) if not c.boxes and not c.weak][: count - len(order)]
    cols = 4
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 3), dpi=80)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), order, strict=False):
        ax.imshow(greys[i], cmap="gray")
        for x, y, w, h in test[i].boxes:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="lime", lw=1.5))
        for (x, y, w, h), conf in preds[i]:
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="red", lw=1.5))
            ax.text(x, y, f"{conf:.2f}", color="red", fontsize=7, va="bottom")
        ax.set_title(
            f"{test[i].patient_id} ({'opacity' if test[i].boxes else 'negative'})", fontsize=8
        )
    return _save(plt, fig, path)


def _fmt(result: dict[str, Any], key: str) -> str:
    low, high = result[f"{key}_ci95"]
    return f"{result[key]:.3f} (95 % CI {low:.3f} to {high:.3f})"


def evaluate_detector(
    model_dir: Path,
    cases: list[DetectorCase],
    splits: list[str],
    training: dict[str, Any],
    sources: dict[str, str],
) -> dict[str, Any]:
    """Measure on the test patients; write the card, ``metrics.json``, FROC and sheet."""
    from dicomnode.inference.registry import read_manifest
    from dicomnode.training.card import DataSource, ModelCard, markdown_table, write_card
    from dicomnode.training.export import MANIFEST_FILE

    model_dir = Path(model_dir)
    spec = read_manifest(model_dir / MANIFEST_FILE)
    measured = measure(model_dir, cases, splits)
    result = measured["metrics"]
    froc_x, froc_y = measured["froc"]
    plot_froc(froc_x, froc_y, model_dir / "froc.png")
    plot_examples(
        measured["test"], measured["greys"], measured["preds"], model_dir / "examples.png"
    )
    goal_rsna = result["rsna_score"] >= 0.25
    goal_auc = result["image_auc"] >= 0.80
    rows = [
        ["RSNA challenge score (IoU 0.40-0.75)", _fmt(result, "rsna_score")],
        [
            "image-level ROC AUC (highest box confidence, 0 without a box)",
            _fmt(result, "image_auc"),
        ],
        [
            "image-level ROC AUC (highest box confidence without the gate)",
            _fmt(result, "image_auc_ungated"),
        ],
        ["image-level ROC AUC (the gate's image score)", _fmt(result, "image_auc_score")],
        ["box sensitivity at IoU 0.4", _fmt(result, "box_sensitivity_iou40")],
        ["false boxes per negative image", _fmt(result, "false_boxes_per_negative")],
        ["images scored by the RSNA score", result["rsna_images_scored"]],
        [
            "test images (with boxes / weak positive / negative)",
            f"{result['n']} ({result['n_with_boxes']} / {result['n_weak_positive']} / "
            f"{result['n_negative']})",
        ],
        ["true boxes", result["true_boxes"]],
    ]
    goals = [
        ["RSNA score >= 0.25", "met" if goal_rsna else f"NOT met: {_fmt(result, 'rsna_score')}"],
        ["image AUC >= 0.80", "met" if goal_auc else f"NOT met: {_fmt(result, 'image_auc')}"],
    ]
    split_counts = tdata.split_counts(splits, [c.group for c in cases])
    card = ModelCard(
        name=spec.name,
        version=spec.version,
        title="CXR opacity detector",
        summary=(
            "Predicts an opacity (pneumonia) probability map on a frontal chest radiograph; "
            "the node turns it into boxes: the image-level score (mean of the 8 highest map "
            "values) gates the image (the classifier gate the seed authors advise), then "
            "threshold, connected components inside the (widened) lung mask, one box per "
            "component with confidence = mean probability in the box, minimum area, "
            "overlapping boxes merged, at most N boxes (the settings below, chosen on the "
            "validation patients). Trained by `dicomnode train detector`."
        ),
        architecture=(
            "`opacity_mobilenet`: ImageNet MobileNetV2 (width 1.0, frozen) encoder, "
            f"trained feature-pyramid decoder; builder {spec.builder}"
        ),
        input=f"{spec.input_size[0]} x {spec.input_size[1]} grey, 1 channel, scaled by 1/255; "
        "output map at 1/8 of the input",
        data=[
            DataSource(
                "NIH ChestX-ray14 box subset (`cxr_opacity_boxes/nih_cxr14_bbox`)",
                "150 radiographs, 100 with radiologist Pneumonia boxes, 50 with other "
                "findings' boxes only (negatives here).",
                "CC0 1.0 (NIH Clinical Center)",
                "Wang et al., ChestX-ray8, CVPR 2017",
            ),
            DataSource(
                "NIH ChestX-ray14 image labels (`cxr_multisource`, source nih_cxr14)",
                "431 normal (negatives everywhere) and 438 pneumonia (weak positives: "
                "image-level loss only) radiographs, 384 px.",
                "CC0 1.0 (NIH Clinical Center)",
            ),
        ],
        split_method=(
            "By patient (NIH file prefix), both sources together, stratified by whether "
            "the patient has a Pneumonia box, only a pneumonia label, or neither; groups "
            f"ranked by SHA-256 of `{SALT}:<patient>`, 60 % / 15 % / 25 %."
        ),
        split_counts=split_counts,
        training=training,
        metrics=result,
        tables=[
            ("Goals of issue 22", markdown_table(["goal", "result"], goals)),
            ("Boxes and images on the test patients", markdown_table(["metric", "value"], rows)),
            (
                "Post-processing (manifest [postprocess])",
                markdown_table(["key", "value"], list(result["postprocess"].items())),
            ),
        ],
        plots=[
            ("FROC on the test patients", "froc.png"),
            (
                "Test images: true boxes green, predicted red with confidence (written by "
                "`dicomnode evaluate`; not committed, it shows the NIH images)",
                "examples.png",
            ),
        ],
        commands=[
            training.get("command", "python3 -m dicomnode.cli train detector"),
            f"python3 -m dicomnode.cli evaluate models/{NAME}",
        ],
        limitations=[
            "Few boxes: about 60 training images with Pneumonia boxes; intervals are wide.",
            "The RSNA score counts only images with box labels (weak positives have no "
            "box truth); the image AUC uses every test image (weak positives included).",
            "NIH labels are text-mined; the box set's negatives carry other findings.",
            "Images are NIH PNG/JPEG exports, not the DICOM a modality sends.",
        ],
    )
    del sources
    write_card(model_dir, card)
    return result


def _cases_from(table: dict[str, Any]) -> list[DetectorCase]:
    boxed = read_labels(Path(table["labels"]), Path(table["images"]))
    weak: list[DetectorCase] = []
    if table.get("image_labels"):
        weak = read_image_labels(
            Path(table["image_labels"]),
            table.get("negative_label", "normal"),
            table.get("positive_label", "pneumonia"),
            table.get("image_source") or None,
        )
    return combine_cases(boxed, weak)


def encode_all(encoder: Any, images: np.ndarray, folder: Path, progress: bool) -> list[np.ndarray]:
    """The frozen encoder's features of ``images`` and their mirror images (cached in
    ``folder``: a resumed run does not recompute them)."""
    from tqdm.auto import tqdm

    cache = folder / "features.npz"
    if cache.is_file():
        with np.load(cache) as data:
            if int(data["count"]) == len(images):
                return [data[f"f{k}"] for k in range(6)]
    parts: list[list[np.ndarray]] = [[] for _ in range(6)]
    step = 32
    for start in tqdm(
        range(0, len(images), step), desc="encoder features", unit="batch", disable=not progress
    ):
        x = images[start : start + step].astype(np.float32)[..., None] / 255.0
        for flip, batch in enumerate((x, x[:, :, ::-1])):
            outs = encoder.predict(batch, verbose=0)
            for k, out in enumerate(outs):
                parts[flip * 3 + k].append(out.astype(np.float16))
    features = [np.concatenate(p) for p in parts]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".features.tmp.npz"
    arrays: dict[str, Any] = {f"f{k}": f for k, f in enumerate(features)}
    np.savez(tmp, count=np.asarray(len(images)), **arrays)
    tmp.replace(cache)
    return features


def train(args: argparse.Namespace) -> Path:
    """Train, choose the post-processing on validation, export, evaluate on test."""
    import keras
    from tqdm.auto import tqdm

    from dicomnode.inference.detector import image_score
    from dicomnode.nets.detector import mobilenet_v2_encoder, opacity_decoder, opacity_mobilenet
    from dicomnode.training import metrics as m
    from dicomnode.training.export import export_model
    from dicomnode.training.loop import FitSettings, fit

    labels = Path(args.labels or BOX_DATA / "labels_rsna_format.csv")
    image_dir = Path(args.images or BOX_DATA / "images")
    size = args.input_size
    out_size = size // 8
    epochs = args.epochs or DEFAULTS["epochs"]
    batch_size = args.batch_size or DEFAULTS["batch_size"]
    table: dict[str, Any] = {
        "target": "detector",
        "seed": args.seed,
        "split_salt": SALT,
        "labels": str(labels.resolve()),
        "images": str(image_dir.resolve()),
        "image_labels": str(Path(args.image_labels).resolve()) if args.image_labels else "",
        "image_source": args.image_source or "",
        "negative_label": args.negative_label,
        "positive_label": args.positive_label,
    }
    if args.limit:
        table["limit"] = args.limit
    cases = _cases_from(table)
    if args.limit:
        cases = cases[: args.limit]
    splits = assign_splits(cases)
    index = tdata.split_indices(splits)
    if not len(index["train"]) or not len(index["val"]):
        raise TrainingError(
            f"{len(cases)} labelled images are too few for a train and a validation split"
        )
    progress = not args.no_progress
    loaded = [
        load_case(c, size) for c in tqdm(cases, desc="images", unit="image", disable=not progress)
    ]
    images = np.stack([g for g, _, _ in loaded])
    shapes = [s for _, _, s in loaded]
    targets = np.stack(
        [targets_at(mk, c, out_size) for (_, mk, _), c in zip(loaded, cases, strict=True)]
    )
    pretrained = Path(args.pretrained) if args.pretrained else None
    if pretrained is not None and not pretrained.is_dir():
        raise TrainingError(f"pretrained weights folder not found: {str(pretrained)!r}")
    encoder = mobilenet_v2_encoder(size, pretrained)
    folder = checkpoint_dir(args)
    features = encode_all(encoder, images, folder, progress)
    train_idx, val_idx = index["train"], index["val"]
    steps = int(np.ceil(len(train_idx) / batch_size))
    flipped_targets = targets[:, :, ::-1]
    lspec, lmodel = lung_model(REPO_ROOT / "models")
    val_lungs = lungs_of([images[i] for i in val_idx], lspec, lmodel)
    val_cases = [cases[i] for i in val_idx]
    val_shapes = [shapes[i] for i in val_idx]

    def train_batches(
        epoch: int, rng: np.random.Generator
    ) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        del epoch
        for batch in tdata.batches(len(train_idx), batch_size, rng):
            chosen = train_idx[batch]
            flip = rng.random(len(chosen)) < 0.5  # seed 003: horizontal flip half the time
            xs = [
                np.where(
                    flip[:, None, None, None], features[3 + k][chosen], features[k][chosen]
                ).astype(np.float32)
                for k in range(3)
            ]
            ys = np.where(flip[:, None, None, None], flipped_targets[chosen], targets[chosen])
            yield xs, ys

    def val_maps(model: Any) -> np.ndarray:
        inputs = [features[k][val_idx].astype(np.float32) for k in range(3)]
        return np.asarray(model.predict(inputs, batch_size=16, verbose=0), np.float32)[..., 0]

    def validate(model: Any) -> dict[str, float]:
        maps = val_maps(model)
        labels_v = np.array([c.label for c in val_cases])
        auc = m.roc_auc(labels_v, np.array([image_score(p, TOP_K) for p in maps]))
        _, score = choose_postprocess(maps, val_lungs, val_cases, val_shapes, EPOCH_GRID)
        return {"val_auc": auc, "val_rsna": score, "val_score": score + AUC_SHARE * auc}

    builder = {"input_size": size, "channels": args.channels}

    def build() -> Any:
        model = opacity_decoder(size, args.channels)
        schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=epochs * steps)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=detector_loss)
        return model

    settings = FitSettings.for_command(
        args,
        epochs=epochs,
        steps_per_epoch=steps,
        monitor="val_score",
        fingerprint={
            "target": "detector",
            "builder": builder,
            "lr": args.lr,
            "batch": batch_size,
            "images": len(cases),
            "pretrained": bool(pretrained),
        },
    )
    result = fit(
        build, train_batches, validate, settings, custom_objects={"detector_loss": detector_loss}
    )
    chosen, val_rsna = choose_postprocess(val_maps(result.model), val_lungs, val_cases, val_shapes)
    print(
        f"post-processing chosen on validation (RSNA {val_rsna:.4f}): {chosen.as_table()}",
        flush=True,
    )
    full = opacity_mobilenet(size, args.channels, encoder=encoder, decoder=result.model)
    training = {
        **result.record("detector", args.seed, SALT, "score"),
        "train_loss_by_epoch": [round(h["loss"], 6) for h in result.history],
        "validation_score": f"RSNA score (best of {EPOCH_GRID}) + {AUC_SHARE} x image AUC",
        "val_auc_by_epoch": [round(h["val_auc"], 4) for h in result.history],
        "val_rsna_by_epoch": [round(h["val_rsna"], 4) for h in result.history],
        "val_rsna_chosen_postprocess": round(val_rsna, 4),
        "batch_size": batch_size,
        "optimizer": f"Adam, learning rate {args.lr} cosine-annealed to 0",
        "loss": "pixel-labelled images: 0.5 BCE + 0.5 IoU loss of the map; every image: "
        "BCE of the top-8 mean against the image label",
        "augmentation": "horizontal flip half the time (seed 003)",
        "encoder": "MobileNetV2 ImageNet (frozen)" if pretrained else "MobileNetV2 random (frozen)",
        "command": "python3 -m dicomnode.cli " + " ".join(sys.argv[1:]),
    }
    export_model(
        full,
        args.out,
        name=Path(args.out).name,
        version=VERSION,
        task="detector",
        architecture="opacity_mobilenet",
        input_size=(size, size),
        channels=1,
        builder=builder,
        training=table,
        extra_tables={"postprocess": chosen.as_table()},
        description="Opacity detector trained by `dicomnode train detector`; see MODEL_CARD.md.",
    )
    summary = evaluate_detector(args.out, cases, splits, training, {})
    print(
        f"test: RSNA score {summary['rsna_score']:.4f}, image AUC {summary['image_auc']:.4f} "
        f"on {summary['n']} images",
        flush=True,
    )
    return Path(args.out)


def evaluate(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """``dicomnode evaluate``: re-measure with the labels and images the model was trained
    on (their paths are in the manifest's ``[training]`` table)."""
    from dicomnode.training.card import read_metrics
    from dicomnode.training.export import MANIFEST_FILE, training_table

    del data_dir
    table = training_table(Path(model_dir) / MANIFEST_FILE)
    try:
        training = dict(read_metrics(Path(model_dir)).get("training", {}))
    except (OSError, ValueError):
        training = {}
    cases = _cases_from(table)
    if table.get("limit"):
        cases = cases[: int(table["limit"])]
    splits = assign_splits(cases, str(table.get("split_salt", SALT)))
    return evaluate_detector(Path(model_dir), cases, splits, {**table, **training}, {})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode train detector``."""
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="CSV",
        help="RSNA-format labels (patientId,x,y,width,height,Target); default: "
        f"{BOX_DATA / 'labels_rsna_format.csv'}",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of <patientId>.dcm|.png|.jpg images; default: {BOX_DATA / 'images'}",
    )
    parser.add_argument(
        "--image-labels",
        type=Path,
        default=None,
        metavar="CSV",
        help=f"image-level labels (path,label[,patient_id][,source]), e.g. {IMAGE_LABELS}",
    )
    parser.add_argument("--image-source", default=None, help="use only rows of this source")
    parser.add_argument("--negative-label", default="normal")
    parser.add_argument("--positive-label", default="pneumonia")
    parser.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"MobileNetV2 ImageNet .npy folder, e.g. {PRETRAINED} (default: random encoder)",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--input-size", type=int, default=DEFAULTS["input_size"])
    parser.add_argument("--channels", type=int, default=DEFAULTS["channels"], help="decoder width")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="initial learning rate")


register(
    Target(
        name="detector",
        summary="opacity detector (seeds 002/003, ImageNet encoder) on RSNA-format boxes",
        train=train,
        evaluate=evaluate,
        add_arguments=add_arguments,
        default_out=f"models/{NAME}",
    )
)
