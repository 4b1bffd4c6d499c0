"""``dicomnode train detector``: the seeds 002/003 opacity net on RSNA-format labels.

Input: a labels CSV in the RSNA Pneumonia Detection format
(``patientId,x,y,width,height,Target``; one row per box, or one row with empty box
columns and ``Target`` 0 for an image without opacity) and a folder of images named
``<patientId>.dcm`` (or ``.png``/``.jpg``). Only patients whose image is in the folder
are used. Boxes are in source pixels.

Training as the seeds: the boxes painted as a mask at the input size, the residual
down-sampling net (``opacity_resnet``) at a reduced width, loss 0.5 * BCE + 0.5 * IoU
loss, Adam with a cosine-annealed learning rate from 1e-3, horizontal flips (seed 003's
augmentation), best epoch by validation mean IoU. Split by patient (``patientId``),
stratified by whether the patient has an opacity.

No RSNA images ship with this project, so no detector model ships; the command is
tested end to end on a small synthetic RSNA-format folder.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.training import (
    DEFAULT_DATA_DIR,
    Target,
    TrainingError,
    register,
)
from dicomnode.training import data as tdata

NAME = "cxr-opacity-detector"
VERSION = "1.0.0"
SALT = "dicomnode-detector-v1"
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")
DEFAULTS: dict[str, Any] = {
    "input_size": 256,
    "channels": 16,
    "n_blocks": 2,
    "depth": 4,
    "epochs": 10,
    "batch_size": 8,
    "lr": 1e-3,
}


@dataclass
class DetectorCase:
    """One patient's image and its boxes (x, y, width, height) in source pixels."""

    patient_id: str
    image: Path
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


def read_labels(labels: Path, images: Path) -> list[DetectorCase]:
    """The labelled patients whose image is in ``images``, with their boxes."""
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
    if not by_patient:
        raise TrainingError(
            f"no image in {str(images)!r} matches a patientId of {str(labels)!r} "
            f"(expected files named <patientId>{'|'.join(IMAGE_SUFFIXES)})"
        )
    return [by_patient[k] for k in sorted(by_patient)]


def assign_splits(items: list[DetectorCase], salt: str = SALT) -> list[str]:
    """The split of each patient, stratified by whether it has an opacity."""
    strata = {c.patient_id: bool(c.boxes) for c in items}
    by_group = tdata.split_groups(strata, salt, strata=strata)
    splits = [by_group[c.patient_id] for c in items]
    tdata.assert_group_disjoint([c.patient_id for c in items], splits)
    return splits


def load_case(case: DetectorCase, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image resized with ``INTER_AREA`` and its painted box mask at ``size``."""
    grey = tdata.read_grey(case.image)
    rows, cols = grey.shape
    mask = np.zeros((size, size), np.uint8)
    for x, y, w, h in case.boxes:
        x0, y0 = round(x * size / cols), round(y * size / rows)
        x1, y1 = round((x + w) * size / cols), round((y + h) * size / rows)
        mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 1
    return tdata.resize(grey, size), mask


def _mean_iou(probs: np.ndarray, masks: np.ndarray) -> float:
    from dicomnode.training import metrics as m

    return float(np.mean([m.iou(p > 0.5, t) for p, t in zip(probs, masks, strict=True)]))


def measure(model_dir: Path, labels: Path, images: Path) -> dict[str, Any]:
    """Mask IoU/Dice and image-level AUC (peak probability) on the test patients."""
    from dicomnode.inference.detector import detector_input
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training import metrics as m
    from dicomnode.training.export import MANIFEST_FILE, training_table
    from dicomnode.training.loop import predict

    manifest = Path(model_dir) / MANIFEST_FILE
    spec = read_manifest(manifest)
    salt = str(training_table(manifest).get("split_salt", SALT))
    items = read_labels(labels, images)
    splits = assign_splits(items, salt)
    test = [c for c, s in zip(items, splits, strict=True) if s == "test"]
    if not test:
        raise TrainingError("the test split is empty: too few labelled images")
    size = spec.input_size[0]
    pairs = [load_case(c, size) for c in test]
    x = detector_input([p[0] for p in pairs], spec)  # the node's own pre-processing
    masks = np.stack([p[1] for p in pairs]).astype(bool)
    probs = predict(load_model(spec), x)[..., 0]
    has = np.array([bool(c.boxes) for c in test], dtype=np.int64)
    result: dict[str, Any] = {
        "n": len(test),
        "mean_iou": _mean_iou(probs, masks),
        "mean_dice": float(
            np.mean([m.dice(p > 0.5, t) for p, t in zip(probs, masks, strict=True)])
        ),
        "split_counts": tdata.split_counts(splits, [c.patient_id for c in items]),
    }
    if 0 < has.sum() < has.size:
        result["image_auc"] = m.roc_auc(has, probs.reshape(len(test), -1).max(axis=1))
    return result


def evaluate_detector(
    model_dir: Path, labels: Path, images: Path, training: dict[str, Any]
) -> dict[str, Any]:
    """Measure on the test split and write the card and ``metrics.json``."""
    from dicomnode.inference.registry import read_manifest
    from dicomnode.training.card import DataSource, ModelCard, markdown_table, write_card
    from dicomnode.training.export import MANIFEST_FILE

    spec = read_manifest(Path(model_dir) / MANIFEST_FILE)
    result = measure(model_dir, labels, images)
    rows = [["mean IoU of the box masks", result["mean_iou"]]]
    rows += [["mean Dice of the box masks", result["mean_dice"]]]
    if "image_auc" in result:
        rows.append(["image-level ROC AUC (peak probability)", result["image_auc"]])
    rows.append(["test patients", result["n"]])
    card = ModelCard(
        name=spec.name,
        version=spec.version,
        title="CXR opacity detector",
        summary=(
            "Predicts a mask of lung opacities on a frontal chest radiograph; the node turns "
            "it into boxes (threshold 0.5, one box per connected component). Trained with "
            "the seeds 002/003 recipe by `dicomnode train detector`."
        ),
        architecture=f"`opacity_resnet` with builder arguments {spec.builder}",
        input=f"{spec.input_size[0]} x {spec.input_size[1]} grey, 1 channel, scaled by 1/255",
        data=[
            DataSource(
                f"RSNA-format labels {Path(labels).name} with images from {Path(images).name}",
                "Boxes painted as masks at the input size.",
                "as given by the data's provider (RSNA Pneumonia Detection Challenge data: "
                "Kaggle competition terms)",
            )
        ],
        split_method=(
            "By patient (patientId), stratified by whether the patient has an opacity; "
            f"groups ranked by SHA-256 of `{training.get('split_salt', SALT)}:<patientId>`, "
            "70 % / 15 % / 15 %."
        ),
        split_counts=result["split_counts"],
        training=training,
        metrics={k: v for k, v in result.items() if k != "split_counts"},
        tables=[("Masks on the test patients", markdown_table(["metric", "value"], rows))],
        commands=[
            "python3 -m dicomnode.cli train detector --labels stage_2_train_labels.csv "
            "--images stage_2_train_images"
        ],
        limitations=["Boxes painted as masks are coarse targets; IoU here is pixel IoU."],
    )
    write_card(Path(model_dir), card)
    return {k: v for k, v in result.items() if k != "split_counts"}


def train(args: argparse.Namespace) -> Path:
    """Train, export to ``--out``, evaluate on the test patients, write the card."""
    import keras

    from dicomnode.nets import opacity_resnet
    from dicomnode.training import losses
    from dicomnode.training.export import export_model
    from dicomnode.training.loop import FitSettings, fit, predict

    if args.images is None:
        raise TrainingError("give the folder of RSNA images with --images DIR")
    labels = args.labels or Path(args.data) / "rsna_pneumonia" / "stage_2_train_labels.csv"
    size = args.input_size
    epochs = args.epochs or DEFAULTS["epochs"]
    batch_size = args.batch_size or DEFAULTS["batch_size"]
    items = read_labels(labels, args.images)
    splits = assign_splits(items)
    index = tdata.split_indices(splits)
    if not len(index["train"]) or not len(index["val"]):
        raise TrainingError(
            f"{len(items)} labelled images are too few for a train and a validation split"
        )
    pairs = [load_case(c, size) for c in items]
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    train_idx, val_idx = index["train"], index["val"]
    steps = int(np.ceil(len(train_idx) / batch_size))
    val_x = images[val_idx].astype(np.float32)[..., None] / 255.0
    val_y = masks[val_idx].astype(bool)

    def train_batches(epoch: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
        for batch in tdata.batches(len(train_idx), batch_size, rng):
            chosen = train_idx[batch]
            flip = rng.random(len(chosen)) < 0.5  # seed 003: horizontal flip half the time
            pairs = zip(chosen, flip, strict=True)
            xs, ys = zip(
                *(
                    (images[i][:, ::-1], masks[i][:, ::-1]) if f else (images[i], masks[i])
                    for i, f in pairs
                ),
                strict=True,
            )
            x, y = np.stack(xs), np.stack(ys)
            yield x.astype(np.float32)[..., None] / 255.0, y.astype(np.float32)[..., None]

    def validate(model: Any) -> dict[str, float]:
        probs = predict(model, val_x)[..., 0]
        return {"val_iou": _mean_iou(probs, val_y)}

    builder = {
        "input_size": size,
        "channels": args.channels,
        "n_blocks": args.n_blocks,
        "depth": args.depth,
    }

    def build() -> Any:
        model = opacity_resnet(**builder)
        schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=epochs * steps)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=losses.bce_iou_loss)
        return model

    settings = FitSettings.for_command(
        args,
        epochs=epochs,
        steps_per_epoch=steps,
        monitor="val_iou",
        fingerprint={"target": "detector", "builder": builder, "lr": args.lr, "batch": batch_size},
    )
    result = fit(build, train_batches, validate, settings)
    training = {
        **result.record("detector", args.seed, SALT, "iou"),
        "train_loss_by_epoch": [round(h["loss"], 6) for h in result.history],
        "batch_size": batch_size,
        "optimizer": f"Adam, learning rate {args.lr} cosine-annealed to 0",
        "loss": "0.5 * binary cross-entropy + 0.5 * IoU loss",
        "augmentation": "horizontal flip half the time (seed 003)",
    }
    export_model(
        result.model,
        args.out,
        name=Path(args.out).name,
        version=VERSION,
        task="detector",
        architecture="opacity_resnet",
        input_size=(size, size),
        channels=1,
        builder=builder,
        training={
            "target": "detector",
            "seed": args.seed,
            "split_salt": SALT,
            "labels": str(Path(labels).resolve()),
            "images": str(Path(args.images).resolve()),
        },
        description="Opacity detector trained by `dicomnode train detector`; see MODEL_CARD.md.",
    )
    summary = evaluate_detector(args.out, labels, args.images, training)
    print(f"test: mean IoU {summary['mean_iou']:.4f} on {summary['n']} patients")
    return Path(args.out)


def evaluate(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """``dicomnode evaluate``: re-measure with the labels and images the model was trained on
    (their paths are in the manifest's ``[training]`` table)."""
    from dicomnode.training.card import read_metrics
    from dicomnode.training.export import MANIFEST_FILE, training_table

    table = training_table(Path(model_dir) / MANIFEST_FILE)
    try:
        training = dict(read_metrics(Path(model_dir)).get("training", {}))
    except (OSError, ValueError):
        training = {}
    return evaluate_detector(
        Path(model_dir), Path(table["labels"]), Path(table["images"]), {**table, **training}
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode train detector``."""
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="CSV",
        help="RSNA labels (patientId,x,y,width,height,Target); default: "
        f"{DEFAULT_DATA_DIR / 'rsna_pneumonia' / 'stage_2_train_labels.csv'}",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of <patientId>.dcm (or .png/.jpg) images",
    )
    parser.add_argument("--input-size", type=int, default=DEFAULTS["input_size"])
    parser.add_argument(
        "--channels", type=int, default=DEFAULTS["channels"], help="width (seed 32; default 16)"
    )
    parser.add_argument("--n-blocks", type=int, default=DEFAULTS["n_blocks"])
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="initial learning rate")


register(
    Target(
        name="detector",
        summary="opacity detector (seeds 002/003) on RSNA-format labels and images",
        train=train,
        evaluate=evaluate,
        add_arguments=add_arguments,
        default_out=f"models/{NAME}",
    )
)
