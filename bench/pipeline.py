#!/usr/bin/env python3
"""Chest X-ray pipeline benchmark with the full-width seed architectures.

Usage::

    python3 bench/pipeline.py             # batch 1 and batch 16
    python3 bench/pipeline.py --quick     # batch 1 and batch 4
    python3 bench/pipeline.py --shipped   # the models in models/ as config.toml runs them

With ``--shipped`` the pipeline is the default configuration's (``config.toml``: the
shipped lung U-Net, ensemble members and opacity detector in ``models/``), timed in
the same run against a baseline: the same models without the detector, called through
``model.predict`` as before the compiled predictors (branch ``arch``). It also counts
the "triggered tf.function retracing" warnings during the timed studies. Target: at
most 1.5 s per image at batch 1 on the 2-core CPU.

Builds the seed architectures at full width with random weights (timing only; these
are never shipped): the lung U-Net, VGG-16, VGG-19 and Inception-V3 with the seed
head, and the residual opacity net as detector. It saves them with manifests in a
temporary folder, loads them through the model registry exactly as the node does, and
times one study of 1 image and one of N images (copies of a 1024 x 1024 radiograph)
through the whole pipeline: decode, lung mask, crop, ensemble, Grad-CAM, detector.
Every image is treated as abnormal so the detector always runs (worst case).

Prints per-step seconds per image and writes the table to ``bench/RESULTS.md`` under
``## pipeline``. Targets: at most 3 s per image on the 2-core CPU; at most 20 ms per
image at batch 16 on an H100 (run there with KERAS_BACKEND=jax).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import keras  # noqa: E402
from results import RESULTS, machine_description, write_section  # noqa: E402

from dicomnode.config import CXRSettings, RoutingSettings  # noqa: E402
from dicomnode.inference.registry import configure_devices, sha256_of  # noqa: E402
from dicomnode.nets import ARCHITECTURES, GRADCAM_LAYERS  # noqa: E402
from dicomnode.pipelines.cxr import CXRPipeline  # noqa: E402
from dicomnode.pipelines.types import InstanceInput, StudyInput  # noqa: E402

CLASSES = [("bacterial", "53084003"), ("covid19", "840539006"), ("normal", "17621005")]
STEPS = ("decode", "lung_mask", "lung_crop", "ensemble", "gradcam", "boxes")


def _save(root: Path, name: str, model: keras.Model, task: str, channels: int, **extra: object):
    folder = root / name
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    lines = [
        f'name = "{name}"',
        'version = "bench"',
        f'task = "{task}"',
        f'architecture = "{extra.get("architecture", name)}"',
        'device_uid = "1.2.826.0.1.3680043.10.999.1"',
        "[weights]",
        'file = "model.keras"',
        'format = "keras"',
        f'sha256 = "{sha256_of(folder / "model.keras")}"',
        "[input]",
        "size = [256, 256]",
        f"channels = {channels}",
    ]
    if "weight" in extra:
        lines += ["[ensemble]", f"weight = {extra['weight']}"]
    if "layer" in extra:
        lines += ["[gradcam]", f'layer = "{extra["layer"]}"']
    if task == "classifier":
        for cls, code in CLASSES:
            lines += [
                "[[classes]]",
                f'name = "{cls}"',
                f'code_value = "{code}"',
                'coding_scheme = "SCT"',
                f'code_meaning = "{cls}"',
            ]
    (folder / "manifest.toml").write_text("\n".join(lines) + "\n")


def build_models(root: Path) -> None:
    """The full-width seed architectures with random weights, saved with manifests."""
    keras.utils.set_random_seed(0)
    _save(root, "lung", ARCHITECTURES["lung_unet"](), "lung-mask", 1)
    for arch, weight in (
        ("vgg16_classifier", 0.1),
        ("vgg19_classifier", 0.4),
        ("inceptionv3_classifier", 0.5),
    ):
        _save(
            root,
            arch,
            ARCHITECTURES[arch](),
            "classifier",
            3,
            weight=weight,
            layer=GRADCAM_LAYERS[arch],
        )
    _save(root, "detector", ARCHITECTURES["opacity_resnet"](), "detector", 1)


def study_of(path: Path, n: int) -> StudyInput:
    ds = dcmread(path, stop_before_pixels=True)
    base = InstanceInput(
        path=path,
        sop_instance_uid="",
        sop_class_uid=str(ds.SOPClassUID),
        series_instance_uid="1.2.3",
        modality=ds.get("Modality"),
        body_part_examined=ds.get("BodyPartExamined"),
        view_position=ds.get("ViewPosition"),
        image_type=None,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
    )
    return StudyInput(
        generate_uid(), tuple(replace(base, sop_instance_uid=generate_uid()) for _ in range(n))
    )


class _RetraceCounter(logging.Handler):
    """Counts TensorFlow's "triggered tf.function retracing" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retracing" in record.getMessage():
            self.count += 1


def _time(pipeline: CXRPipeline, image: Path, sizes: tuple[int, ...], repeats: int) -> dict:
    """Median seconds per image per batch size (after one untimed study of that size),
    per-step seconds of the median run, and the retracing warnings while timing."""
    counter = _RetraceCounter()
    logging.getLogger("tensorflow").addHandler(counter)
    out: dict = {}
    try:
        for n in sizes:
            pipeline.analyse(study_of(image, n))
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                result = pipeline.analyse(study_of(image, n))
                runs.append((time.perf_counter() - started, result.timings))
            runs.sort(key=lambda r: r[0])
            total, timings = runs[len(runs) // 2]
            out[n] = (total / n, {k: v / n for k, v in timings.items()})
    finally:
        logging.getLogger("tensorflow").removeHandler(counter)
    out["retracing"] = counter.count
    return out


def shipped(args: argparse.Namespace) -> int:
    """The default configuration's models against the baseline, in one run."""
    import os

    from dicomnode.config import load_settings

    settings = load_settings(REPO / "config.toml").cxr
    sizes = (1, 4)
    device = configure_devices()
    configs = {
        "baseline (no detector, model.predict)": replace(settings, detector="", batch_size=4),
        "default (detector, compiled predictors)": replace(settings, batch_size=4),
    }
    rows = []
    for label, cxr in configs.items():
        pipeline = CXRPipeline(cxr, RoutingSettings())
        pipeline.load()
        if label.startswith("baseline"):

            def old_predict(name: str, batch, p=pipeline):  # type: ignore[no-untyped-def]
                with p._model_lock:
                    return p.models[name].predict(batch, verbose=0)

            pipeline._predict = old_predict  # type: ignore[method-assign]
        timed = _time(pipeline, args.image, sizes, args.repeats)
        rows.append((label, timed))
        print(label, {n: round(timed[n][0], 3) for n in sizes}, "retracing", timed["retracing"])
    load = os.getloadavg()[0]
    steps = STEPS
    table = [
        "| configuration | batch | s/image | " + " | ".join(steps) + " | retracing warnings |",
        "|" + "---|" * (len(steps) + 4),
    ]
    for label, timed in rows:
        for n in sizes:
            per_image, per_step = timed[n]
            table.append(
                f"| {label} | {n} | {per_image:.3f} | "
                + " | ".join(f"{per_step.get(k, 0):.3f}" for k in steps)
                + f" | {timed['retracing'] if n == sizes[0] else ''} |"
            )
    print("\n".join(table))
    if not args.no_write:
        write_section(
            RESULTS,
            "## pipeline (shipped models)",
            [
                "## pipeline (shipped models)",
                "",
                f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine_description()}; Keras {keras.__version__}, {device}",
                f"- command: `python3 bench/pipeline.py --shipped --repeats {args.repeats}`",
                "- config.toml's [cxr] (models/: lung U-Net, VGG-16/19, Inception-V3 mean "
                "ensemble, Grad-CAM, the opacity detector on every image) against the baseline "
                "in the same run: the same models without the detector, called through "
                "model.predict (branch arch); batch_size 4; a 1024 x 1024 CR; median of "
                f"{args.repeats} studies per size after one untimed; seconds per image",
                f"- 1-minute load average at the end: {load:.1f} on 2 CPUs (shared with "
                "other work when above 2)",
                "- target: at most 1.5 s per image at batch 1; no retracing warning",
                "",
                *table,
                "",
            ],
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 instead of 16")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--shipped", action="store_true", help="the models in models/")
    parser.add_argument("--repeats", type=int, default=3, help="timed studies per size")
    parser.add_argument(
        "--image",
        type=Path,
        default=REPO.parent
        / "shared"
        / "data"
        / "dicom_cxr"
        / "chest"
        / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        help="a frontal chest radiograph (default: the 1024 x 1024 CR in ../shared/data)",
    )
    args = parser.parse_args()
    if not args.image.exists():
        print(f"{args.image} is absent; pass --image PATH to a frontal chest radiograph")
        return 2
    if args.shipped:
        return shipped(args)
    big = 4 if args.quick else 16
    device = configure_devices()
    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-pipeline-"))
    rows = []
    try:
        started = time.perf_counter()
        build_models(tmp)
        print(f"built and saved the full-width models in {time.perf_counter() - started:.0f} s")
        settings = CXRSettings(
            models_dir=tmp,
            lung_mask="lung",
            members=("vgg16_classifier", "vgg19_classifier", "inceptionv3_classifier"),
            explain_member="vgg16_classifier",
            detector="detector",
            abnormal_threshold=0.0,
            batch_size=big,
        )
        pipeline = CXRPipeline(settings, RoutingSettings())
        started = time.perf_counter()
        pipeline.load()
        print(f"loaded, verified and warmed up in {time.perf_counter() - started:.0f} s")
        for n in (1, big):
            pipeline.analyse(study_of(args.image, n))  # same shapes once more: steady state
            started = time.perf_counter()
            result = pipeline.analyse(study_of(args.image, n))
            total = time.perf_counter() - started
            per_step = {k: v / n for k, v in result.timings.items()}
            rows.append((n, total / n, per_step))
            print(
                f"batch {n:>2}: {total / n:.3f} s per image ("
                + ", ".join(f"{k} {per_step.get(k, 0):.3f}" for k in STEPS)
                + ")"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = "| batch | total s/image | " + " | ".join(STEPS) + " |"
    table = [header, "|" + "---|" * (len(STEPS) + 2)]
    for n, per_image, steps in rows:
        table.append(
            f"| {n} | {per_image:.3f} | "
            + " | ".join(f"{steps.get(k, 0):.3f}" for k in STEPS)
            + " |"
        )
    print("\n".join(table))
    if not args.no_write:
        write_section(
            RESULTS,
            "## pipeline",
            (
                [
                    "## pipeline",
                    "",
                    f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                    f"- machine: {machine_description()}; Keras {keras.__version__}, {device}",
                    f"- command: `python3 bench/pipeline.py{' --quick' if args.quick else ''}`",
                    "- full-width seed architectures, random weights: lung U-Net, VGG-16, "
                    "VGG-19 and Inception-V3 with the seed head (weighted ensemble), Grad-CAM "
                    "on VGG-16 block5_conv3, residual opacity net as detector (forced on); "
                    "a 1024 x 1024 JPEG-baseline CR; seconds per image, steady state",
                    "- target: at most 3 s per image on this 2-core CPU",
                    "",
                    *table,
                    "",
                ]
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
