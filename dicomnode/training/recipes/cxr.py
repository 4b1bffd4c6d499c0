"""The CXR classifier ensemble of seed 000: ``member`` and ``stacking`` targets, and pruning.

* ``dicomnode train member --architecture vgg16_classifier|vgg19_classifier|
  inceptionv3_classifier``: one ensemble member (the builder at a reduced width, the seed
  head, softmax over :data:`~dicomnode.training.cxr_data.CXR_CLASSES`), Adam, the seed's
  augmentation, best epoch on validation macro ROC AUC.
* ``dicomnode prune MODEL_DIR``: APoZ iterative pruning (:mod:`dicomnode.training.prune`)
  of a member, each step fine-tuned with the same runner; writes the kept step as a new
  model folder whose card has the per-step table.
* ``dicomnode train stacking --members A B C``: fits the weighted-average weights of the
  members on the validation split (written into each member's ``[ensemble] weight``),
  trains the seed's stacking meta-learner on the members' validation outputs, recommends
  the strategy to configure by 5-fold cross-validation on those outputs (the simplest
  within one standard error of the best), and writes the ensemble-versus-members
  comparison on the held-out test patients into its card.

The data are :mod:`dicomnode.training.cxr_data` (split by patient, near-duplicates
merged across sources). Keras is imported inside the functions only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.config import ENSEMBLE_STRATEGIES
from dicomnode.training import (
    REPO_ROOT,
    Target,
    TrainingError,
    checkpoint_dir,
    register,
)
from dicomnode.training.card import DataSource, ModelCard, classifier_report, markdown_table

#: Member architectures and how the card names them.
MEMBER_ARCHITECTURES = {
    "vgg16_classifier": "VGG-16",
    "vgg19_classifier": "VGG-19",
    "inceptionv3_classifier": "Inception-V3",
}
MEMBER_VERSION = "1.0.0"
PRUNING_FILE = "pruning.json"
#: Shipped member folders, in the order of ``config.toml`` ``[cxr] members``.
DEFAULT_MEMBERS = ("models/cxr-vgg16", "models/cxr-vgg19", "models/cxr-inceptionv3")
#: The ensemble strategies compared in the stacking card (the node's
#: :func:`dicomnode.inference.geometry.combine`).

#: The card's description of each source of :data:`dicomnode.training.cxr_data.SOURCES`.
DATA_SOURCES = {
    "ieee8023": DataSource(
        "COVID-19 Image Data Collection subset (ieee8023)",
        "138 frontal adult CXRs (COVID-19, bacterial and viral pneumonia, No Finding) from "
        "many sites, snapshot of 27 Jun 2020 (s-mostafa-a/covid-chestxray-dataset @ 173779d); "
        "labels from the upstream metadata, split by `patientid`.",
        "per image (CC BY 3.0/4.0, CC BY-NC-SA 4.0, CC BY-NC-ND 4.0, unspecified); "
        "metadata CC BY-NC-SA 4.0: research and demonstration use only",
        "Cohen et al., arXiv:2003.11597 and arXiv:2006.11988",
    ),
    "3class": DataSource(
        "COVID-19 Image Dataset, 3-way classification (Kaggle, pranavraikokte)",
        "317 images resized to 640 x 640 (Covid, Normal, Viral Pneumonia) as committed in "
        "Dilara-Benli/covid19_image_classification @ f41f7df; Normal and Viral images "
        "derive from the Kermany pediatric set, Covid images from ieee8023. No patient IDs: "
        "each image is its own group after near-duplicate merging.",
        "not stated by the committing repository; Kaggle lists CC BY-SA 4.0 (unverified); "
        "Kermany images CC BY 4.0: research and demonstration use only",
        "Kermany et al., Cell 2018",
    ),
    "nlm": DataSource(
        "Montgomery County and Shenzhen chest X-ray sets (NLM), normal images only",
        "60 adult frontal CXRs read as normal (30 Montgomery, 30 Shenzhen) of the 120-pair "
        "subset at 512 x 512 that also trains `cxr-lung-unet` (rochadiego/"
        "MultiResUNet-lung-segmentation @ 234c65b); one image per patient, each its own "
        "group; the tuberculosis images are not used. They add the adult normals the other "
        "sources lack: members trained without them called 50 of these 60 images COVID-19.",
        "NLM terms: research use, do not redistribute the data, cite the papers; the data "
        "are not shipped here, only weights trained on them",
        "Jaeger et al., Quant Imaging Med Surg 2014;4(6):475-477; Candemir et al., IEEE TMI 2014",
    ),
}

LIMITATIONS = (
    "Trained on a few hundred images from public collections; classes come from "
    "different sources (the normal and viral images of the 3-class set are pediatric, "
    "most COVID-19 images adult), so the model may learn source cues, not disease.",
    "Class 0 `pneumonia` pools bacterial and non-COVID viral pneumonia; the seed's "
    "published models separate `bacterial` instead (order bacterial, covid19, normal).",
    "Held-out test split: a few dozen patients per class; metrics have wide uncertainty.",
    "A film showing a disease outside the three classes still gets one of them: the NLM "
    "sites' tuberculosis films (not used in training) are mostly called normal "
    "(`docs/training.md`).",
)


# --------------------------------------------------------------------------- helpers


def _limitations(data: Any) -> tuple[str, ...]:
    """:data:`LIMITATIONS` and what the classifiers saw (lung crop or whole image)."""
    if data.crop == "lung":
        seen = (
            f"Trained and evaluated on the node's lung crops, made by the CXR pipeline's own "
            f"code with `{data.lung_model}`; another lung model gives other crops (retrain). "
            "Where that model finds no lung the crop is the whole image, as in the node."
        )
    else:
        seen = (
            "Trained and evaluated on the whole image resized to the input size; the node "
            "feeds the lung crop of its lung-mask model, which is close to but not the same "
            "input."
        )
    sources = LIMITATIONS[0]
    if "nlm" in data.sources:
        sources = (
            "Trained on a few hundred images from public collections whose classes come "
            "from different sources: most normal and all viral-pneumonia images of the "
            "3-class set are pediatric, the COVID-19 images adult, and the adult normals "
            "come from two tuberculosis-screening sites (NLM). The model may still learn "
            "source cues (site, age, image processing), not disease."
        )
    return (sources, seen, *LIMITATIONS[1:])


def _input_text(spec: Any, data: Any) -> str:
    """The card's input line of a member."""
    what = (
        f"the node's lung crop (`{data.lung_model}` mask, extent + 5 % per side) of the grey image"
        if data.crop == "lung"
        else "the whole grey image"
    )
    return (
        f"{spec.input_size[0]} x {spec.input_size[1]} x {spec.channels}: {what}, resized, "
        f"repeated to {spec.channels} channels, scaled by {spec.scale:.6g} (1/255, no mean "
        "subtraction, as the seed)"
    )


def _data(
    data_dir: Path, size: int, training: dict[str, Any] | None = None, crop: str | None = None
) -> Any:
    """The CXR set at ``size`` with the split and crop of a model's ``[training]`` table.

    ``crop`` (``lung`` or ``none``) overrides the table's ``crop``; a model trained
    before the crop was recorded saw the whole image (``none``). When the table names
    the lung model's SHA-256, the crops must come from that model.
    """
    from dicomnode.training.cxr_data import (
        CXR_FRACTIONS,
        CXR_SALT,
        LEGACY_SOURCES,
        SOURCES,
        load_cxr_set,
    )

    table = training or {}
    data = load_cxr_set(
        Path(data_dir),
        size,
        fractions=tuple(table.get("split_fractions", CXR_FRACTIONS)),
        salt=str(table.get("split_salt", CXR_SALT)),
        crop=crop or str(table.get("crop", "none")),
        # A new model uses every source; a trained one, those it was trained on.
        sources=tuple(table.get("sources", LEGACY_SOURCES if table else SOURCES)),
    )
    recorded = table.get("crop_lung_model_sha256")
    if data.crop == "lung" and recorded and recorded != data.lung_model_sha256:
        raise TrainingError(
            f"the crops were made by lung model {table.get('crop_lung_model')!r} sha256 "
            f"{recorded!r}, but models/ holds {data.lung_model!r} sha256 "
            f"{data.lung_model_sha256!r}"
        )
    return data


def _input_record(data: Any) -> dict[str, Any]:
    """The ``[training]`` keys that say what the classifiers saw: sources and crop."""
    if data.crop != "lung":
        return {"sources": list(data.sources), "crop": data.crop}
    return {
        "sources": list(data.sources),
        "crop": data.crop,
        "crop_lung_model": data.lung_model,
        "crop_lung_model_sha256": data.lung_model_sha256,
    }


def _validation_metrics(y: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    from dicomnode.training.metrics import accuracy, macro_auc

    p = np.clip(probabilities.astype(np.float64), 1e-7, 1.0)
    return {
        "val_macro_auc": macro_auc(y, p),
        "val_accuracy": accuracy(y, p.argmax(axis=1)),
        "val_loss": float(-np.mean(np.log(p[np.arange(len(y)), y]))),
    }


def _train_batches(pixels: np.ndarray, labels: np.ndarray, batch_size: int, augment: bool) -> Any:
    from dicomnode.training.cxr_data import to_model_input
    from dicomnode.training.data import SEED000_AUGMENTATION, batches

    def make(epoch: int, rng: np.random.Generator) -> Any:
        for index in batches(len(pixels), batch_size, rng):
            images = pixels[index]
            if augment:
                images = np.stack([SEED000_AUGMENTATION.apply(rng, img)[0] for img in images])
            yield to_model_input(images), labels[index]

    return make


def _compile(model: Any, learning_rate: float) -> Any:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
    )
    return model


def _fit_classifier(
    build: Any,
    data: Any,
    batch_size: int,
    epochs: int,
    folder: Path,
    seed: int,
    fingerprint: dict[str, Any],
    progress: bool,
) -> Any:
    """Run the framework's runner on the train split, best epoch on val macro AUC."""
    from dicomnode.training.cxr_data import to_model_input
    from dicomnode.training.loop import FitSettings, fit, predict

    x_train, y_train = data.split("train")
    x_val, y_val = data.split("val")
    val_input = to_model_input(x_val)
    settings = FitSettings(
        epochs=epochs,
        checkpoint_dir=folder,
        seed=seed,
        steps_per_epoch=-(-len(x_train) // batch_size),
        monitor="val_macro_auc",
        mode="max",
        progress=progress,
        fingerprint=fingerprint,
    )
    return fit(
        build,
        _train_batches(x_train, y_train, batch_size, augment=True),
        lambda model: _validation_metrics(y_val, predict(model, val_input)),
        settings,
    )


def set_ensemble_weight(manifest: Path, weight: float) -> None:
    """Write ``[ensemble] weight`` into a manifest (replacing it, or adding the table)."""
    text = Path(manifest).read_text(encoding="utf-8")
    line = f"weight = {float(weight)!r}"
    pattern = re.compile(r"(^\[ensemble\]\s*\n)(?:weight\s*=.*\n)?", re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda m: f"{m.group(1)}{line}\n", text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n[ensemble]\n{line}\n"
    tmp = Path(manifest).with_name(f".{Path(manifest).name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(manifest)


def fit_weights(member_probabilities: np.ndarray, y: np.ndarray, step: float = 0.05) -> list[float]:
    """Weighted-average weights (summing to 1, on a ``step`` grid) maximising macro AUC.

    ``member_probabilities`` is (members, images, classes). Ties go to the weights
    closest to the plain mean, so an uninformative validation set gives equal weights.
    """
    from dicomnode.inference.ensemble import combine
    from dicomnode.training.metrics import macro_auc

    members = member_probabilities.shape[0]
    units = round(1 / step)
    best: tuple[float, float, tuple[float, ...]] | None = None
    for combo in itertools.product(range(units + 1), repeat=members - 1):
        if sum(combo) > units:
            continue
        counts = (*combo, units - sum(combo))
        weights = tuple(c / units for c in counts)
        if max(weights) == 0:
            continue
        auc = round(macro_auc(y, combine(member_probabilities, "weighted", weights)), 10)
        spread = -float(np.sum((np.array(weights) - 1 / members) ** 2))
        key = (auc, spread, weights)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return list(best[2])


def _pruning_section(folder: Path) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    path = folder / PRUNING_FILE
    if not path.is_file():
        return [], {}
    record = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for row in record["steps"]:
        rows.append(
            [
                row["step"],
                f"{row['channels_removed_fraction']:.1%}",
                row["channels"],
                f"{row['parameters']:,}",
                f"{row['parameter_reduction']:.2%}",
                round(row["metric"], 4),
                "**kept**" if row["step"] == record["best_step"] else "",
            ]
        )
    table = markdown_table(
        [
            "step",
            "channels removed",
            "channels",
            "parameters",
            "parameter reduction",
            "validation macro ROC AUC",
            "",
        ],
        rows,
    )
    heading = (
        f"APoZ pruning (step {record['step']:.0%} of the prunable channels, up to "
        f"{record['max_fraction']:.0%}, global ranking, {record['fine_tune_epochs']} "
        f"fine-tuning epochs per step, kept: {record['rule']})"
    )
    best = record["steps"][record["best_step"]]
    summary = {
        "best_step": record["best_step"],
        "parameter_reduction": best["parameter_reduction"],
        "channels_removed_fraction": best["channels_removed_fraction"],
        "val_macro_auc": best["metric"],
        "unpruned_val_macro_auc": record["steps"][0]["metric"],
        "unpruned_parameters": record["steps"][0]["parameters"],
        "parameters": best["parameters"],
    }
    return [(heading, table)], summary


# --------------------------------------------------------------------------- member


def _add_member_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--architecture",
        required=True,
        choices=sorted(MEMBER_ARCHITECTURES),
        help="the dicomnode.nets builder of this member",
    )
    parser.add_argument(
        "--width-multiplier",
        type=float,
        default=0.25,
        help="backbone width (1.0 = the full seed network; default 0.25)",
    )
    parser.add_argument(
        "--head-channels", type=int, default=64, help="filters of the head conv (seed: 1024)"
    )
    parser.add_argument("--input-size", type=int, default=128, help="square input side (seed: 256)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    _add_crop_argument(parser)


def _add_crop_argument(parser: argparse.ArgumentParser) -> None:
    from dicomnode.training.cxr_data import CROPS

    parser.add_argument(
        "--crop",
        choices=CROPS,
        default="lung",
        help="classifier input: the node's lung crop made with models/cxr-lung-unet "
        "(lung, default, what the node feeds the members) or the whole image (none)",
    )


def train_member(args: argparse.Namespace) -> Path:
    """``dicomnode train member``: train, export, evaluate; return the model folder."""
    from dicomnode.nets import ARCHITECTURES, GRADCAM_LAYERS
    from dicomnode.training.cxr_data import CXR_CLASSES, CXR_FRACTIONS, CXR_SALT
    from dicomnode.training.export import export_model

    architecture = args.architecture
    epochs = args.epochs or 40
    batch_size = args.batch_size or 16
    builder = {
        "input_size": args.input_size,
        "n_classes": len(CXR_CLASSES),
        "width_multiplier": args.width_multiplier,
        "head_channels": args.head_channels,
    }
    data = _data(args.data, args.input_size, crop=args.crop)

    def build() -> Any:
        return _compile(ARCHITECTURES[architecture](**builder), args.learning_rate)

    fingerprint = {
        "target": "member",
        "architecture": architecture,
        "builder": builder,
        "learning_rate": args.learning_rate,
        "batch_size": batch_size,
        "split_salt": CXR_SALT,
        **_input_record(data),
    }
    result = _fit_classifier(
        build,
        data,
        batch_size,
        epochs,
        checkpoint_dir(args),
        args.seed,
        fingerprint,
        not args.no_progress,
    )
    out = Path(args.out)
    export_model(
        result.model,
        out,
        name=out.name,
        version=MEMBER_VERSION,
        task="classifier",
        architecture=architecture,
        input_size=(args.input_size, args.input_size),
        channels=3,
        builder=builder,
        classes=CXR_CLASSES,
        gradcam_layer=GRADCAM_LAYERS[architecture],
        ensemble_weight=1 / 3,
        training={
            "target": "member",
            "seed": args.seed,
            "epochs": epochs,
            "best_epoch": result.best_epoch,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "learning_rate": args.learning_rate,
            "augmentation": "seed 000 ImageDataGenerator arguments",
            "split_salt": CXR_SALT,
            "split_fractions": list(CXR_FRACTIONS),
            **_input_record(data),
            "train_seconds": float(result.seconds),
        },
        description=f"{MEMBER_ARCHITECTURES[architecture]} member of the CXR ensemble. "
        "Research and demonstration only, not for diagnosis.",
    )
    (out / PRUNING_FILE).unlink(missing_ok=True)
    evaluate_member(out, args.data)
    return out


def evaluate_member(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Measure a member on the held-out test patients; rewrite its card and metrics."""
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training.card import write_card
    from dicomnode.training.cxr_data import CLASS_NAMES, to_model_input
    from dicomnode.training.export import MANIFEST_FILE, training_table
    from dicomnode.training.loop import predict

    folder = Path(model_dir)
    spec = read_manifest(folder / MANIFEST_FILE)
    training = training_table(folder / MANIFEST_FILE)
    model = load_model(spec)
    data = _data(data_dir, spec.input_size[0], training)
    x_test, y_test = data.split("test")
    probabilities = predict(model, to_model_input(x_test, spec.channels, spec.scale))
    report = classifier_report(y_test, probabilities, CLASS_NAMES, folder, spec.name)
    x_val, y_val = data.split("val")
    val = _validation_metrics(
        y_val, predict(model, to_model_input(x_val, spec.channels, spec.scale))
    )
    prune_tables, pruning = _pruning_section(folder)
    metrics = {
        **report.metrics,
        "val_macro_auc": val["val_macro_auc"],
        "parameters": int(model.count_params()),
        "weights_bytes": spec.weights.stat().st_size,
    }
    if pruning:
        metrics["pruning"] = pruning
    label = MEMBER_ARCHITECTURES.get(spec.architecture, spec.architecture)
    arguments = _builder_arguments(spec, training)
    builder = ", ".join(f"{k}={v}" for k, v in arguments.items())
    head_filters = next(
        (layer.filters for layer in model.layers if layer.name.startswith("extra_conv")),
        arguments.get("head_channels"),
    )
    card = ModelCard(
        name=spec.name,
        version=spec.version,
        title=f"{spec.name}: {label} member of the CXR ensemble",
        summary=(
            f"The {label} classifier (`{spec.architecture}({builder})`, the seed 000 head) "
            f"giving the probabilities of {', '.join(f'`{c}`' for c in CLASS_NAMES)} for a "
            "frontal chest X-ray; one member of the node's ensemble (`config.toml` "
            "[cxr] members). The ensemble's comparison with its members is in "
            "`models/cxr-stacking/MODEL_CARD.md`."
        ),
        architecture=(
            f"{label} backbone at width {arguments.get('width_multiplier')} "
            + (
                "(a small Inception-style stand-in below full width, not Inception-V3) "
                if spec.architecture == "inceptionv3_classifier"
                and arguments.get("width_multiplier") != 1.0
                else ""
            )
            + f"-> ZeroPadding2D(1) -> Conv2D({head_filters}, 5x5, "
            f"stride 2, relu) -> GlobalAveragePooling2D -> Dropout(0.5) -> "
            f"Dense({len(CLASS_NAMES)}, softmax); {metrics['parameters']:,} parameters, "
            f"weights file {metrics['weights_bytes'] / 1e6:.2f} MB"
        ),
        input=_input_text(spec, data),
        data=tuple(DATA_SOURCES[name] for name in data.sources),
        split_method=data.describe(),
        split_counts=data.counts,
        training={
            **{k: v for k, v in training.items() if k != "target" and not k.startswith("builder_")},
            "classes (output order)": ", ".join(
                f"{c.name} (SCT {c.code_value} {c.code_meaning})" for c in spec.classes
            ),
            "ensemble weight": spec.ensemble_weight,
            "validation macro ROC AUC": round(val["val_macro_auc"], 4),
        },
        metrics=metrics,
        tables=[*report.tables, *prune_tables],
        plots=report.plots,
        limitations=_limitations(data),
        commands=_member_commands(folder, spec, training),
    )
    write_card(folder, card)
    return metrics


def _builder_arguments(spec: Any, training: dict[str, Any]) -> dict[str, Any]:
    """The builder arguments of the (unpruned) network: ``[builder]`` or, once pruned,
    the ``builder_*`` keys of ``[training]``."""
    if spec.builder:
        return dict(spec.builder)
    prefix = "builder_"
    return {k.removeprefix(prefix): v for k, v in training.items() if k.startswith(prefix)}


def _member_commands(folder: Path, spec: Any, training: dict[str, Any]) -> list[str]:
    """The commands that made this member (training, then pruning when it was pruned)."""
    name = folder.name.removesuffix("-full")
    full = f"build/{name}-full"
    builder = _builder_arguments(spec, training)
    commands = [
        f"python3 -m dicomnode.cli train member --architecture {spec.architecture} "
        f"--width-multiplier {builder.get('width_multiplier')} "
        f"--head-channels {builder.get('head_channels')} "
        f"--input-size {builder.get('input_size')} --epochs {training.get('epochs')} "
        f"--learning-rate {training.get('learning_rate')} --seed {training.get('seed')} "
        f"--crop {training.get('crop', 'none')} --out {full}",
    ]
    record_path = folder / PRUNING_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        commands.append(
            f"python3 -m dicomnode.cli prune {full} --out models/{name} "
            f"--step {record['step']} --max {record['max_fraction']} "
            f"--tolerance {record['tolerance']} --fine-tune-epochs {record['fine_tune_epochs']}"
            + (f" --learning-rate {record['learning_rate']}" if "learning_rate" in record else "")
            + (f" --seed {record['seed']}" if "seed" in record else "")
        )
    commands.append(f"python3 -m dicomnode.cli evaluate {folder.parent.name}/{folder.name}")
    return commands


# --------------------------------------------------------------------------- pruning


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dicomnode prune``."""
    from dicomnode.training import DEFAULT_DATA_DIR, DEFAULT_SEED

    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a trained member")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="pruned model folder to write"
    )
    parser.add_argument(
        "--step", type=float, default=0.02, help="share of channels removed per step (0.02)"
    )
    parser.add_argument(
        "--max", type=float, default=0.5, dest="max_fraction", help="stop at this share (0.5)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="keep the most pruned step within this of the best validation AUC "
        "(0 = the best step, as the seed)",
    )
    parser.add_argument(
        "--fine-tune-epochs", type=int, default=2, help="epochs of fine-tuning per step"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=3e-4, help="Adam learning rate of fine-tuning"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def prune_member(args: argparse.Namespace) -> Path:
    """``dicomnode prune``: APoZ-prune a member, write the kept step to ``--out``."""
    import keras

    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training.cxr_data import CXR_CLASSES, to_model_input
    from dicomnode.training.export import MANIFEST_FILE, export_model, training_table
    from dicomnode.training.loop import predict
    from dicomnode.training.prune import iterative_prune

    source = Path(args.model_dir)
    spec = read_manifest(source / MANIFEST_FILE)
    training = training_table(source / MANIFEST_FILE)
    if training.get("target") != "member":
        raise TrainingError(
            f"{str(source)!r} was not trained by `dicomnode train member`; "
            "pruning needs a member classifier and its data"
        )
    model = load_model(spec)
    data = _data(args.data, spec.input_size[0], training)
    x_val, y_val = data.split("val")
    val_input = to_model_input(x_val, spec.channels, spec.scale)
    out = Path(args.out)
    work = args.checkpoint_dir or REPO_ROOT / ".checkpoints" / f"{out.name}-prune"
    fingerprint = {
        "source_sha256": spec.sha256,
        "step": args.step,
        "max": args.max_fraction,
        "epochs": args.fine_tune_epochs,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
    }
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "run.json"
    if marker.is_file() and json.loads(marker.read_text()) != fingerprint:
        raise TrainingError(
            f"{str(work)!r} holds another pruning run; delete it or use --checkpoint-dir"
        )
    marker.write_text(json.dumps(fingerprint))

    def fine_tune(pruned: Any, step: int) -> Any:
        snapshot = work / f"step_{step:02d}_input.keras"
        pruned.save(snapshot)  # the runner's build() must return a fresh model

        def build() -> Any:
            fresh = keras.models.load_model(snapshot, compile=False)
            return _compile(fresh, args.learning_rate)

        result = _fit_classifier(
            build,
            data,
            args.batch_size,
            args.fine_tune_epochs,
            work / f"step_{step:02d}_fit",
            args.seed + step,
            {**fingerprint, "prune_step": step},
            not args.no_progress,
        )
        return result.model

    def evaluate(candidate: Any) -> float:
        return _validation_metrics(y_val, predict(candidate, val_input))["val_macro_auc"]

    result = iterative_prune(
        model,
        val_input,
        fine_tune,
        evaluate,
        step=args.step,
        max_fraction=args.max_fraction,
        tolerance=args.tolerance,
        work_dir=work,
        progress=print if not args.no_progress else None,
    )
    print(result.table())
    best = result.best
    rule = (
        "the best validation macro ROC AUC"
        if args.tolerance <= 0
        else f"the most pruned step within {args.tolerance} of the best validation macro ROC AUC"
    )
    export_model(
        result.model,
        out,
        name=out.name,
        version=MEMBER_VERSION,
        task="classifier",
        architecture=spec.architecture,
        input_size=spec.input_size,
        channels=spec.channels,
        scale=spec.scale,
        classes=CXR_CLASSES,
        gradcam_layer=spec.gradcam_layer,
        ensemble_weight=spec.ensemble_weight,
        training={
            **training,
            # The builder arguments describe the unpruned network; the pruned one has fewer
            # channels, so they move to [training] (format "keras" needs no builder).
            **{f"builder_{k}": v for k, v in spec.builder.items()},
            "pruned_from": source.name,
            "pruning_step": result.best_step,
            "pruning_channels_removed": round(best.channels_removed_fraction, 4),
            "pruning_parameter_reduction": round(best.parameter_reduction, 4),
        },
        description=f"{MEMBER_ARCHITECTURES[spec.architecture]} member of the CXR ensemble, "
        f"APoZ-pruned ({best.parameter_reduction:.1%} fewer parameters). "
        "Research and demonstration only, not for diagnosis.",
    )
    record = {
        "step": args.step,
        "max_fraction": args.max_fraction,
        "tolerance": args.tolerance,
        "fine_tune_epochs": args.fine_tune_epochs,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "rule": rule,
        "ranking": "global",
        "best_step": result.best_step,
        "steps": [
            {k: v for k, v in vars(row).items() if k != "channels_per_layer"}
            for row in result.steps
        ],
        "channels_per_layer": [row.channels_per_layer for row in result.steps],
    }
    (out / PRUNING_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    evaluate_member(out, args.data)
    return out


# --------------------------------------------------------------------------- stacking


def _add_stacking_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members",
        nargs="+",
        type=Path,
        default=[REPO_ROOT / m for m in DEFAULT_MEMBERS],
        metavar="DIR",
        help="member model folders, in config.toml [cxr] members order",
    )
    parser.add_argument(
        "--hidden-units", type=int, default=None, help="meta hidden units (seed: 9)"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument(
        "--weight-step", type=float, default=0.05, help="grid step of the ensemble weights"
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        help="cross-validation folds of the validation split that choose the strategy",
    )


def _member_predictions(members: list[Path], data: Any) -> tuple[list[Any], dict[str, Any]]:
    """Specs and each split's (members, images, classes) probabilities and labels."""
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training.cxr_data import to_model_input
    from dicomnode.training.export import MANIFEST_FILE
    from dicomnode.training.loop import predict

    specs = [read_manifest(Path(m) / MANIFEST_FILE) for m in members]
    sizes = {(s.input_size, s.channels, s.scale) for s in specs}
    if len(sizes) != 1:
        raise TrainingError(f"members must share one input, got {sorted(map(str, sizes))}")
    models = [load_model(s) for s in specs]
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        pixels, labels = data.split(split)
        x = to_model_input(pixels, specs[0].channels, specs[0].scale)
        out[split] = (np.stack([predict(m, x) for m in models]), labels)
    return specs, out


def cross_validate_strategies(
    member_probabilities: np.ndarray,
    y: np.ndarray,
    *,
    folds: int,
    seed: int,
    weight_step: float,
    hidden_units: int,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    bootstrap: int = 200,
) -> dict[str, tuple[float, float]]:
    """Out-of-fold macro ROC AUC of each strategy on the validation outputs, and its
    standard error (``bootstrap`` resamples of the images).

    The validation images are cut into ``folds`` seeded folds; for each, the weights are
    fitted and a meta-learner trained on the other folds exactly as for the shipped
    models, and the fold is predicted. The pooled out-of-fold AUC estimates each
    strategy on unseen patients without touching the test split, so the strategy to
    configure is chosen on it (fitting and judging on the same images favours the
    fitted strategies).
    """
    import keras

    from dicomnode.inference.ensemble import combine
    from dicomnode.nets import stacking_meta
    from dicomnode.training.metrics import bootstrap_resamples, macro_auc

    n_members, n, n_classes = member_probabilities.shape
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    out = {strategy: np.zeros((n, n_classes)) for strategy in ENSEMBLE_STRATEGIES}
    for k in range(folds):
        fit_on, held = fold_of != k, fold_of == k
        p_fit, p_held = member_probabilities[:, fit_on], member_probabilities[:, held]
        weights = fit_weights(p_fit, y[fit_on], weight_step)
        keras.utils.set_random_seed(seed * 101 + k)
        meta = _compile(
            stacking_meta(n_members, n_classes, hidden_units, concatenated=True), learning_rate
        )
        meta.fit(
            np.concatenate(list(p_fit), axis=1).astype(np.float32),
            y[fit_on],
            epochs=epochs,
            batch_size=batch_size,
            verbose=0,
        )
        out["weighted"][held] = combine(p_held, "weighted", weights)
        out["mean"][held] = combine(p_held, "mean")
        out["vote"][held] = combine(p_held, "vote")
        out["stacking"][held] = combine(
            p_held,
            "stacking",
            meta=lambda x, m=meta: np.asarray(m.predict(x, verbose=0)),  # type: ignore[misc]
        )
    resamples = bootstrap_resamples(y, bootstrap, seed)
    result = {}
    for strategy in ENSEMBLE_STRATEGIES:
        draws = [macro_auc(y[index], out[strategy][index]) for index in resamples]
        result[strategy] = (macro_auc(y, out[strategy]), float(np.std(draws)))
    return result


#: Strategies from the simplest (nothing fitted) to the most fitted.
SIMPLEST_FIRST = ("mean", "vote", "weighted", "stacking")


def choose_strategy(cv: dict[str, tuple[float, float]]) -> str:
    """The one-standard-error rule: the simplest strategy whose out-of-fold macro AUC is
    within one (bootstrap) standard error of the best one's."""
    best = max(cv, key=lambda strategy: cv[strategy][0])
    floor = cv[best][0] - cv[best][1]
    return next(strategy for strategy in SIMPLEST_FIRST if cv[strategy][0] >= floor)


def train_stacking(args: argparse.Namespace) -> Path:
    """``dicomnode train stacking``: fit ensemble weights, train the meta-learner."""
    from dicomnode.inference.registry import read_manifest
    from dicomnode.nets import stacking_meta
    from dicomnode.training.cxr_data import CXR_CLASSES, CXR_FRACTIONS, CXR_SALT
    from dicomnode.training.data import batches
    from dicomnode.training.export import MANIFEST_FILE, export_model, training_table
    from dicomnode.training.loop import FitSettings, fit

    members = [Path(m) for m in args.members]
    out = Path(args.out)
    strays = [str(m) for m in members if m.resolve().parent != out.resolve().parent]
    if strays:
        raise TrainingError(
            f"members must be folders beside --out {str(out)!r} (the node finds them by name "
            f"in one models folder); these are not: {strays}"
        )
    first = read_manifest(members[0] / MANIFEST_FILE)
    crops = {str(training_table(m / MANIFEST_FILE).get("crop", "none")) for m in members}
    if len(crops) != 1:
        raise TrainingError(f"members were trained on different inputs (crop {sorted(crops)})")
    data = _data(args.data, first.input_size[0], training_table(members[0] / MANIFEST_FILE))
    specs, predictions = _member_predictions(members, data)
    val_p, val_y = predictions["val"]
    weights = fit_weights(val_p, val_y, args.weight_step)
    for folder, weight in zip(members, weights, strict=True):
        set_ensemble_weight(folder / MANIFEST_FILE, weight)
        print(f"{folder.name}: [ensemble] weight = {weight}")
    n_members, n_classes = len(members), len(CXR_CLASSES)
    hidden = args.hidden_units or n_members * n_classes
    features = np.concatenate(list(val_p), axis=1).astype(np.float32)
    epochs = args.epochs or 150
    batch_size = args.batch_size or 16
    cv = cross_validate_strategies(
        val_p,
        val_y,
        folds=args.folds,
        seed=args.seed,
        weight_step=args.weight_step,
        hidden_units=hidden,
        learning_rate=args.learning_rate,
        epochs=epochs,
        batch_size=batch_size,
    )
    recommended = choose_strategy(cv)
    for strategy in ENSEMBLE_STRATEGIES:
        print(
            f"{args.folds}-fold out-of-fold validation macro ROC AUC, {strategy}: "
            f"{cv[strategy][0]:.4f} (standard error {cv[strategy][1]:.4f})"
        )
    print(f"recommended [cxr] strategy (one-standard-error rule): {recommended}")

    def build() -> Any:
        return _compile(
            stacking_meta(n_members, n_classes, hidden, concatenated=True), args.learning_rate
        )

    def train_batches(epoch: int, rng: np.random.Generator) -> Any:
        for index in batches(len(features), batch_size, rng):
            yield features[index], val_y[index]

    result = fit(
        build,
        train_batches,
        lambda model: {},
        FitSettings.for_command(
            args,
            epochs=epochs,
            steps_per_epoch=-(-len(features) // batch_size),
            monitor="loss",
            mode="min",
            fingerprint={
                "target": "stacking",
                "members": [s.sha256 for s in specs],
                "hidden_units": hidden,
                "learning_rate": args.learning_rate,
                "batch_size": batch_size,
            },
        ),
    )
    builder = {
        "n_members": n_members,
        "n_classes": n_classes,
        "hidden_units": hidden,
        "concatenated": True,
    }
    export_model(
        result.model,
        out,
        name=out.name,
        version=MEMBER_VERSION,
        task="stacking",
        architecture="stacking_meta",
        input_size=(n_members * n_classes, 1),
        channels=1,
        scale=1.0,
        builder=builder,
        classes=CXR_CLASSES,
        training={
            "target": "stacking",
            "members": [m.name for m in members],
            "seed": args.seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "learning_rate": args.learning_rate,
            "fitted_on": "members' outputs on the validation split",
            "weight_grid_step": args.weight_step,
            "cv_folds": args.folds,
            **{
                f"cv_macro_auc_{strategy}": round(cv[strategy][0], 6)
                for strategy in ENSEMBLE_STRATEGIES
            },
            **{
                f"cv_macro_auc_se_{strategy}": round(cv[strategy][1], 6)
                for strategy in ENSEMBLE_STRATEGIES
            },
            "recommended_strategy": recommended,
            "split_salt": CXR_SALT,
            "split_fractions": list(CXR_FRACTIONS),
            **_input_record(data),
            "train_seconds": float(result.seconds),
        },
        description="Stacking meta-learner of the CXR ensemble (seed 000): Dense(9, relu) -> "
        "Dense(3, softmax) on the members' concatenated probabilities. "
        "Research and demonstration only, not for diagnosis.",
    )
    evaluate_stacking(out, args.data)
    return out


def _by_source(
    sources: Sequence[str], labels: np.ndarray, probabilities: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Per source of the test images: their count, true classes and, per model, the
    accuracy and the classes it called (a model that follows the source, not the
    lungs, shows here: e.g. adult normals called COVID-19)."""
    from dicomnode.training.cxr_data import CLASS_NAMES

    out: dict[str, dict[str, Any]] = {}
    for source in dict.fromkeys(sources):
        rows = np.array([s == source for s in sources])
        y = labels[rows]
        entry: dict[str, Any] = {
            "n": int(rows.sum()),
            "true": {c: int((y == i).sum()) for i, c in enumerate(CLASS_NAMES)},
            "models": {},
        }
        for name, p in probabilities.items():
            called = p[rows].argmax(axis=1)
            entry["models"][name] = {
                "accuracy": float((called == y).mean()),
                "called": {c: int((called == i).sum()) for i, c in enumerate(CLASS_NAMES)},
            }
        out[source] = entry
    return out


def _by_source_table(by_source: dict[str, dict[str, Any]]) -> str:
    """:func:`_by_source` as a Markdown table: one row per source and model."""
    from dicomnode.training.cxr_data import CLASS_NAMES

    rows = []
    for source, entry in by_source.items():
        true = ", ".join(f"{c} {n}" for c, n in entry["true"].items() if n)
        for name, result in entry["models"].items():
            rows.append(
                [
                    source,
                    f"{entry['n']} ({true})",
                    name,
                    result["accuracy"],
                    *(result["called"][c] for c in CLASS_NAMES),
                ]
            )
    return markdown_table(
        [
            "source",
            "images (true class)",
            "model",
            "accuracy",
            *(f"called {c}" for c in CLASS_NAMES),
        ],
        rows,
    )


def evaluate_stacking(model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Ensemble versus members on the held-out test patients; the stacking model's card."""
    from dicomnode.inference.ensemble import combine
    from dicomnode.inference.registry import load_model, read_manifest
    from dicomnode.training.card import write_card
    from dicomnode.training.cxr_data import CLASS_NAMES
    from dicomnode.training.export import MANIFEST_FILE, training_table
    from dicomnode.training.loop import predict
    from dicomnode.training.metrics import (
        accuracy,
        macro_auc,
        one_vs_rest_auc,
        paired_macro_auc_difference,
    )
    from dicomnode.training.metrics import top_label_calibration as calibration

    folder = Path(model_dir)
    spec = read_manifest(folder / MANIFEST_FILE)
    training = training_table(folder / MANIFEST_FILE)
    meta = load_model(spec)
    names = list(training.get("members", []))
    if not names:
        raise TrainingError(f"{str(folder)!r}: [training] 'members' is missing")
    members = [folder.parent / n for n in names]
    first = read_manifest(members[0] / MANIFEST_FILE)
    data = _data(data_dir, first.input_size[0], training)
    specs, predictions = _member_predictions(members, data)
    test_p, test_y = predictions["test"]
    val_p, val_y = predictions["val"]
    weights = [float(s.ensemble_weight or 0.0) for s in specs]

    def combined(p: np.ndarray, strategy: str) -> np.ndarray:
        return combine(
            p,
            strategy,
            weights=weights if strategy == "weighted" else None,
            meta=(lambda x: predict(meta, x)) if strategy == "stacking" else None,
        )

    def summary(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
        aucs = one_vs_rest_auc(y, p)
        return {
            "macro_auc": macro_auc(y, p),
            "auc": dict(zip(CLASS_NAMES, aucs, strict=True)),
            "accuracy": accuracy(y, p.argmax(axis=1)),
            "ece": calibration(y, p).ece,
        }

    results: dict[str, dict[str, Any]] = {}
    for name, spec_m, p in zip(names, specs, test_p, strict=True):
        results[name] = {**summary(test_y, p), "weight": spec_m.ensemble_weight}
    for strategy in ENSEMBLE_STRATEGIES:
        results[f"ensemble ({strategy})"] = summary(test_y, combined(test_p, strategy))
    val_auc = {name: macro_auc(val_y, p) for name, p in zip(names, val_p, strict=True)}
    for strategy in ENSEMBLE_STRATEGIES:
        val_auc[f"ensemble ({strategy})"] = macro_auc(val_y, combined(val_p, strategy))
    best_name = max(names, key=lambda n: results[n]["macro_auc"])
    best_member = results[best_name]["macro_auc"]
    cv = {s: training.get(f"cv_macro_auc_{s}") for s in ENSEMBLE_STRATEGIES}
    cv_se = {s: training.get(f"cv_macro_auc_se_{s}") for s in ENSEMBLE_STRATEGIES}
    recommended = str(training.get("recommended_strategy", "weighted"))
    versus_best = paired_macro_auc_difference(
        test_y, combined(test_p, recommended), test_p[names.index(best_name)]
    )

    def cv_cell(name: str) -> Any:
        strategy = name.removeprefix("ensemble (").removesuffix(")")
        value = cv.get(strategy) if name.startswith("ensemble") else None
        if value is None:
            return ""
        se = cv_se.get(strategy)
        return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    rows = [
        [
            f"**{name}** (recommended)" if name == f"ensemble ({recommended})" else name,
            r["macro_auc"],
            *(r["auc"][c] for c in CLASS_NAMES),
            r["accuracy"],
            r["ece"],
            val_auc[name],
            cv_cell(name),
        ]
        for name, r in results.items()
    ]
    comparison = markdown_table(
        [
            "model",
            "macro ROC AUC",
            *(f"AUC {c}" for c in CLASS_NAMES),
            "accuracy",
            "ECE",
            "validation macro AUC (fitted on it)",
            f"validation macro AUC ({training.get('cv_folds', '?')}-fold out-of-fold)",
        ],
        rows,
    )
    comparison += (
        "\n\nThe weights and the meta-learner are fitted on the validation split, so their "
        "validation AUC is optimistic (and every member's best epoch and pruning step were "
        "chosen on it too); the out-of-fold column refits them on the other folds. The "
        "recommended strategy, `" + recommended + "`, is the simplest (mean, vote, weighted, "
        "stacking, in that order) whose out-of-fold AUC is within one bootstrap standard "
        "error of the best (the one-standard-error rule). The rule reads only the validation "
        "split. "
        + (
            "It was fixed before these lung-crop models were trained (it was adopted on the "
            "earlier whole-image ensemble), and nothing here (strategy, weights, epochs, "
            "pruning step) was chosen by looking at these test numbers"
            if data.crop == "lung"
            else "It was adopted after a first run had shown these test numbers (there the "
            "best out-of-fold strategy, `weighted`, had been recommended)"
        )
        + f"; with {int(test_y.size)} test images, differences of a few thousandths between "
        "the rows are within noise. The recommended ensemble minus the best member on the "
        f"test split (`{best_name}`, the best one there): {versus_best.difference:+.4f}, "
        f"95 % paired bootstrap interval {versus_best.low:+.4f} to {versus_best.high:+.4f}; "
        f"the ensemble is at least as high in {versus_best.share_at_least_zero * 100:.0f} % of "
        f"{versus_best.resamples} resamples of the test images."
    )
    if "nlm" in data.sources:
        comparison += (
            " The members were retrained once, with the commands below, after the NLM adult "
            "normals were added to the data (see `docs/training.md`); nothing was tuned on "
            "test numbers after that."
        )
    by_source = _by_source(
        [image.source for image in data.images if image.split == "test"],
        test_y,
        {
            f"ensemble ({recommended})": combined(test_p, recommended),
            **dict(zip(names, test_p, strict=True)),
        },
    )
    for stale in folder.glob("*_roc.png"):  # plots of a previously recommended strategy
        for suffix in ("roc", "confusion", "reliability"):
            stale.with_name(stale.name.replace("_roc.png", f"_{suffix}.png")).unlink(
                missing_ok=True
            )
    reports = [
        classifier_report(
            test_y,
            combined(test_p, strategy),
            CLASS_NAMES,
            folder,
            f"ensemble ({strategy})",
            file_prefix="" if strategy == "stacking" else f"{strategy}_",
        )
        for strategy in dict.fromkeys((recommended, "stacking"))
    ]
    metrics = {
        "recommended_strategy": recommended,
        "cv_macro_auc": cv,
        "cv_macro_auc_se": cv_se,
        "members": {n: results[n] for n in names},
        "ensembles": {s: results[f"ensemble ({s})"] for s in ENSEMBLE_STRATEGIES},
        "weights": dict(zip(names, weights, strict=True)),
        "best_member_macro_auc": best_member,
        "versus_best_member": {"member": best_name, **versus_best.as_dict()},
        "validation_macro_auc": val_auc,
        "recommended": reports[0].metrics,
        "stacking": reports[-1].metrics,
        "n": int(test_y.size),
        "by_source": by_source,
    }
    card = ModelCard(
        name=spec.name,
        version=spec.version,
        title=f"{spec.name}: the CXR ensemble (stacking meta-learner and comparison)",
        summary=(
            "The seed 000 ensemble of "
            + ", ".join(f"`{n}`" for n in names)
            + ". This folder holds the stacking meta-learner (Dense(9, relu) -> Dense(3, "
            "softmax) on the members' concatenated probabilities, `config.toml` [cxr] "
            'strategy = "stacking"); the weighted average uses the members\' `[ensemble] '
            "weight`, fitted here on the validation split. Below, every strategy and every "
            "member on the same held-out test patients; the strategy to configure is "
            f"`{recommended}`, chosen by cross-validation on the validation split. "
            + (
                f"Members see the node's lung crops (made with `{data.lung_model}`)."
                if data.crop == "lung"
                else "Members see the whole image (not the node's lung crop)."
            )
        ),
        architecture=f"stacking_meta({', '.join(f'{k}={v}' for k, v in spec.builder.items())})",
        input=(
            f"the {len(names)} members' class probabilities concatenated "
            f"({len(names) * len(CLASS_NAMES)} values, member order as listed)"
        ),
        data=tuple(DATA_SOURCES[name] for name in data.sources),
        split_method=data.describe(),
        split_counts=data.counts,
        training={
            **{k: v for k, v in training.items() if k != "target"},
            "ensemble weights (validation macro AUC, grid search)": ", ".join(
                f"{n} {w:g}" for n, w in zip(names, weights, strict=True)
            ),
        },
        metrics=metrics,
        tables=[
            ("Ensemble versus members (test split)", comparison),
            ("By source (test split)", _by_source_table(by_source)),
            *(table for report in reports for table in report.tables),
        ],
        plots=[plot for report in reports for plot in report.plots],
        limitations=_limitations(data),
        commands=[
            "python3 -m dicomnode.cli train stacking --members "
            + " ".join(f"models/{n}" for n in names),
            f"python3 -m dicomnode.cli evaluate models/{spec.name}",
        ],
    )
    write_card(folder, card)
    return metrics


register(
    Target(
        name="member",
        summary="a CXR ensemble member (VGG-16, VGG-19 or Inception-V3 with the seed head)",
        train=train_member,
        evaluate=evaluate_member,
        add_arguments=_add_member_arguments,
        default_out="build/cxr-member",
    )
)
register(
    Target(
        name="stacking",
        summary="the CXR ensemble: weighted-average weights and the stacking meta-learner",
        train=train_stacking,
        evaluate=evaluate_stacking,
        add_arguments=_add_stacking_arguments,
        default_out="models/cxr-stacking",
    )
)
