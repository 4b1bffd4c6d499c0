"""``dicomnode train lung-unet``: the seed 000 lung-mask U-Net on Montgomery/Shenzhen pairs.

Data: ``cxr_lung_masks/montgomery_shenzhen_512px`` (``pairs.csv``; 8-bit 512 x 512
CXRs with manual lung masks, binarised with ``> 127``). Each file is one patient of the
NLM Montgomery or Shenzhen set, so the group key is the file name; the split is
stratified by source (Montgomery, Shenzhen).

Pre-processing is the CXR pipeline's: grey image resized to the input size with
``cv2.INTER_AREA``, times 1/255. Training: seed 000's augmentation (rotation 10,
shifts 0.05, shear 5, zoom 0.3, horizontal flip, same transform for the mask),
Adam with a cosine-decayed learning rate, binary cross-entropy + soft Dice loss (the
seed does not state its U-Net loss), best epoch by validation Dice.

Evaluation is the pipeline's mask step: threshold 0.5 at the model's size, keep the
two largest components, resize (nearest) to the 512 x 512 ground truth, then Dice and
IoU per held-out patient.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.training import (
    Target,
    TrainingError,
    register,
    require_dir,
)
from dicomnode.training import data as tdata

NAME = "cxr-lung-unet"
VERSION = "1.0.0"
SALT = "dicomnode-lung-unet-v1"
#: Epochs of linear learning-rate warm-up before the cosine decay.
WARMUP_EPOCHS = 3
PAIRS = Path("cxr_lung_masks") / "montgomery_shenzhen_512px"
DEFAULTS: dict[str, Any] = {
    "input_size": 128,
    "width": 8,
    "merge": "concatenate",
    "epochs": 60,
    "batch_size": 8,
    "lr": 3e-4,
}


@dataclass(frozen=True)
class LungCase:
    """One image/mask pair and its group (patient) key."""

    image: Path
    mask: Path
    group: str
    source: str


def cases(data_dir: Path) -> list[LungCase]:
    """The Montgomery/Shenzhen pairs listed in ``pairs.csv``."""
    root = require_dir(Path(data_dir) / PAIRS, "Montgomery/Shenzhen lung mask pairs")
    listing = root / "pairs.csv"
    if not listing.is_file():
        raise TrainingError(f"{str(listing)!r} not found")
    with listing.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        name = row["filename"]
        out.append(
            LungCase(
                image=root / "images" / name,
                mask=root / "masks" / name,
                group=Path(name).stem,
                source=row["source"],
            )
        )
    if not out:
        raise TrainingError(f"{str(listing)!r} lists no pairs")
    return out


def assign_splits(items: list[LungCase], salt: str = SALT) -> list[str]:
    """The split of each case (by patient, stratified by source)."""
    strata = {c.group: c.source for c in items}
    by_group = tdata.split_groups(strata, salt, strata=strata)
    splits = [by_group[c.group] for c in items]
    tdata.assert_group_disjoint([c.group for c in items], splits)
    return splits


def load_arrays(items: list[LungCase], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images resized as the pipeline does (uint8) and masks (0/1) at ``size``."""
    images = np.stack([tdata.resize(tdata.read_grey(c.image), size) for c in items])
    masks = np.stack(
        [tdata.resize_mask((tdata.read_grey(c.mask) > 127).astype(np.uint8), size) for c in items]
    )
    return images, masks


def _predict_masks(model: Any, images: np.ndarray, scale: float) -> np.ndarray:
    from dicomnode.training.loop import predict

    x = images.astype(np.float32)[..., None] * scale
    return predict(model, x, batch_size=8)[..., 0]


def measure(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Dice and IoU of the model in ``model_dir`` on each held-out test patient."""
    import cv2

    from dicomnode.inference.lung import keep_largest
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training import metrics as m
    from dicomnode.training.export import MANIFEST_FILE, training_table

    manifest = Path(model_dir) / MANIFEST_FILE
    spec = read_manifest(manifest)
    salt = str(training_table(manifest).get("split_salt", SALT))
    items = cases(data_dir)
    splits = assign_splits(items, salt)
    test = [c for c, s in zip(items, splits, strict=True) if s == "test"]
    model = load_model(spec)
    height, width = spec.input_size
    images = np.stack([tdata.resize(tdata.read_grey(c.image), (height, width)) for c in test])
    probs = _predict_masks(model, images, spec.scale)
    dices, ious = [], []
    for case, prob in zip(test, probs, strict=True):
        truth = tdata.read_grey(case.mask) > 127
        mask = keep_largest(prob > 0.5)
        full = cv2.resize(
            mask.astype(np.uint8), truth.shape[::-1], interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        dices.append(m.dice(full, truth))
        ious.append(m.iou(full, truth))
    return {
        "mean_dice": float(np.mean(dices)),
        "mean_iou": float(np.mean(ious)),
        "median_dice": float(np.median(dices)),
        "min_dice": float(np.min(dices)),
        "n": len(test),
        "per_image": {
            c.group: {"dice": round(d, 6), "iou": round(j, 6)}
            for c, d, j in zip(test, dices, ious, strict=True)
        },
        "split_counts": tdata.split_counts(splits, [c.group for c in items]),
        "by_source": {
            source: float(
                np.mean([d for c, d in zip(test, dices, strict=True) if c.source == source])
            )
            for source in sorted({c.source for c in test})
        },
    }


def evaluate(
    model_dir: Path, data_dir: Path, training: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Measure on the test split and write ``MODEL_CARD.md``, ``metrics.json``, plots."""
    from dicomnode.inference.registry import read_manifest
    from dicomnode.training.card import (
        DataSource,
        ModelCard,
        markdown_table,
        plot_histogram,
        write_card,
    )
    from dicomnode.training.export import MANIFEST_FILE, training_record

    model_dir = Path(model_dir)
    spec = read_manifest(model_dir / MANIFEST_FILE)
    result = measure(model_dir, data_dir)
    training = training_record(model_dir, training)
    dices = [v["dice"] for v in result["per_image"].values()]
    plot_histogram(dices, model_dir / "dice_histogram.png", "Test Dice per patient", "Dice")
    rows = [
        ["mean Dice", result["mean_dice"]],
        ["mean IoU", result["mean_iou"]],
        ["median Dice", result["median_dice"]],
        ["lowest Dice", result["min_dice"]],
        *[[f"mean Dice, {s}", v] for s, v in result["by_source"].items()],
        ["test patients", result["n"]],
    ]
    card = ModelCard(
        name=NAME,
        version=spec.version,
        title="CXR lung-mask U-Net (demo scale)",
        summary=(
            "Segments both lungs on a frontal chest radiograph. The node uses the mask to "
            "crop the lungs (5 % margin) before classification and to keep opacity boxes "
            "inside the lungs. Trained by this project with the seed 000 recipe at a "
            f"reduced width (width {spec.builder.get('width')}, the seed's is 64)."
        ),
        architecture=(
            f"`lung_unet` (seed 000 dilated U-Net) with builder arguments {spec.builder}; "
            "sigmoid output, threshold 0.5. The seed notebook adds the skip connections; at "
            "width 8 that variant kept a constant output (its 2-channel ReLU layer before the "
            "sigmoid died) in our runs, so this model concatenates them (the classic U-Net)"
        ),
        input=(
            f"{spec.input_size[0]} x {spec.input_size[1]} grey, 1 channel, resized with "
            "cv2.INTER_AREA, scaled by 1/255"
        ),
        data=[
            DataSource(
                "Montgomery County and Shenzhen chest X-ray sets (NLM), 120-pair subset at "
                "512 x 512 with manual lung masks (Montgomery masks by NLM, Shenzhen masks by "
                "Stirenko et al. 2018)",
                "Copy from rochadiego/MultiResUNet-lung-segmentation; images resized from the "
                "originals by that repository's author; masks binarised with > 127.",
                "NLM terms: research use, do not redistribute the data, cite the papers; the "
                "repository's MIT licence covers its code only. The data are not shipped here, "
                "only weights trained on them",
                "Jaeger et al., Quant Imaging Med Surg 2014;4(6):475-477; Candemir et al., "
                "IEEE TMI 2014",
            )
        ],
        split_method=(
            "By patient (one file per patient), stratified by source (Montgomery, "
            "Shenzhen): groups ranked by SHA-256 of "
            f"`{training.get('split_salt', SALT)}:<file stem>`, 70 % / 15 % / 15 % "
            "(train / validation / test). The split is computed, not stored; "
            "`dicomnode.training.recipes.lung.assign_splits` reproduces it."
        ),
        split_counts=result["split_counts"],
        training=training,
        metrics={k: v for k, v in result.items() if k != "split_counts"},
        tables=[
            (
                "Dice and IoU per test patient, at the 512 x 512 ground truth",
                markdown_table(["metric", "value"], rows),
            )
        ],
        plots=[("Test Dice per patient", "dice_histogram.png")],
        commands=[
            "python3 -m dicomnode.cli train lung-unet --data ../shared/data",
            f"python3 -m dicomnode.cli evaluate models/{NAME} --data ../shared/data",
        ],
        limitations=[
            "Trained on 84 adult PA radiographs of two TB screening sets; it has not seen "
            "AP bedside films, children, devices or large effusions, and may fail on them.",
            "Masks are measured on 512 x 512 downsampled images, not original resolution.",
            "The mask is evaluated as the node uses it: thresholded at 0.5 and reduced to "
            "the two largest components.",
        ],
    )
    write_card(model_dir, card)
    return {k: v for k, v in result.items() if k not in ("per_image", "split_counts")}


def train(args: argparse.Namespace) -> Path:
    """Train, export to ``--out``, evaluate on the test split, write the card."""
    import keras

    from dicomnode.nets import lung_unet
    from dicomnode.training import losses
    from dicomnode.training import metrics as m
    from dicomnode.training.export import export_model
    from dicomnode.training.loop import FitSettings, fit

    size = args.input_size
    epochs = args.epochs or DEFAULTS["epochs"]
    batch_size = args.batch_size or DEFAULTS["batch_size"]
    items = cases(args.data)
    splits = assign_splits(items)
    images, masks = load_arrays(items, size)
    index = tdata.split_indices(splits)
    train_idx, val_idx = index["train"], index["val"]
    augmentation = tdata.SEED000_AUGMENTATION
    steps = int(np.ceil(len(train_idx) / batch_size))
    val_x = images[val_idx].astype(np.float32)[..., None] / 255.0
    val_y = masks[val_idx].astype(bool)

    def train_batches(epoch: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
        for batch in tdata.batches(len(train_idx), batch_size, rng):
            xs: list[Any] = []
            ys: list[Any] = []
            for i in train_idx[batch]:
                x, y = augmentation.apply(rng, images[i], masks[i])
                xs.append(x)
                ys.append(y)
            yield (
                np.stack(xs).astype(np.float32)[..., None] / 255.0,
                np.stack(ys).astype(np.float32)[..., None],
            )

    def validate(model: Any) -> dict[str, float]:
        probs = model.predict(val_x, batch_size=8, verbose=0)[..., 0]
        return {
            "val_dice": float(
                np.mean([m.dice(p > 0.5, t) for p, t in zip(probs, val_y, strict=True)])
            )
        }

    builder = {"input_size": size, "width": args.width, "merge": args.merge}

    def build() -> Any:
        model = lung_unet(**builder)
        # Linear warm-up over the first epochs: at full rate from the start, the
        # 2-channel ReLU layer before the sigmoid tends to die (constant output).
        warmup = WARMUP_EPOCHS * steps
        schedule = keras.optimizers.schedules.CosineDecay(
            args.lr / 100,
            decay_steps=max(1, (epochs - WARMUP_EPOCHS) * steps),
            alpha=0.05,
            warmup_target=args.lr,
            warmup_steps=warmup,
        )
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=losses.bce_dice_loss)
        return model

    settings = FitSettings.for_command(
        args,
        epochs=epochs,
        steps_per_epoch=steps,
        monitor="val_dice",
        fingerprint={"target": "lung-unet", "builder": builder, "lr": args.lr, "batch": batch_size},
    )
    result = fit(build, train_batches, validate, settings)
    training = {
        **result.record("lung-unet", args.seed, SALT, "dice"),
        "batch_size": batch_size,
        "optimizer": f"Adam, learning rate warmed up linearly to {args.lr} over "
        f"{WARMUP_EPOCHS} epochs, then cosine-decayed to 5 %",
        "loss": "binary cross-entropy + soft Dice",
        "augmentation": "seed 000: rotation 10, shift 0.05, shear 5, zoom 0.3, horizontal flip",
    }
    export_model(
        result.model,
        args.out,
        name=NAME,
        version=VERSION,
        task="lung-mask",
        architecture="lung_unet",
        input_size=(size, size),
        channels=1,
        builder=builder,
        training={k: training[k] for k in ("target", "seed", "split_salt")},
        description="Lung-mask U-Net trained by `dicomnode train lung-unet`; see MODEL_CARD.md.",
    )
    summary = evaluate(args.out, args.data, training)
    print(f"test: mean Dice {summary['mean_dice']:.4f}, mean IoU {summary['mean_iou']:.4f}")
    return Path(args.out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode train lung-unet``."""
    parser.add_argument(
        "--input-size", type=int, default=DEFAULTS["input_size"], help="square input (default 128)"
    )
    parser.add_argument(
        "--width", type=int, default=DEFAULTS["width"], help="U-Net width (seed 64; default 8)"
    )
    parser.add_argument(
        "--merge",
        choices=("add", "concatenate"),
        default=DEFAULTS["merge"],
        help="skip connections: the seed notebook's 'add' (default) or the classic 'concatenate'",
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default 3e-4)"
    )


register(
    Target(
        name="lung-unet",
        summary="lung-mask U-Net (seed 000) on the Montgomery/Shenzhen pairs",
        train=train,
        evaluate=lambda model_dir, data_dir: evaluate(model_dir, data_dir),
        add_arguments=add_arguments,
        default_out=f"models/{NAME}",
    )
)
