"""The chest X-ray pipeline (seed 000, with the detector advice of seeds 002/003).

For the frontal chest radiographs of a study (see :mod:`dicomnode.routing`), batched
over the study's images:

1. decode to the 8-bit grey image (:func:`dicomnode.imaging.to_uint8`);
2. lung mask: resize to the U-Net's input, /255, predict, threshold 0.5, keep the two
   largest components (the lungs);
3. lung crop: the mask's extent relaxed by 5 % per side, mapped to source pixels, cut
   from the source image and resized to the classifiers' input, grey repeated to 3 channels;
4. ensemble: every member predicts; combined by the configured strategy (weighted
   average with the manifests' weights by default, or mean, majority vote, stacking);
5. opacity boxes, only when the study looks abnormal (1 - P(normal) above a threshold):
   from the detector's probability map (threshold, connected components, one box per
   component, confidence = mean probability), kept inside the lungs; without a detector,
   from the Grad-CAM heat map thresholded inside the lungs; the result says which;
6. Grad-CAM of the explained class on the configured member's layer.

Everything ends in source-image pixels. Models are loaded once by :meth:`load`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dicomnode import metrics
from dicomnode.config import CXRSettings, RoutingSettings
from dicomnode.errors import ConfigError
from dicomnode.imaging import Image8, ImageDecodeError, to_uint8
from dicomnode.inference.geometry import (
    Box,
    boxes_from_probability,
    combine,
    crop,
    lung_box,
    map_in_source,
    resize_map,
)
from dicomnode.inference.gradcam import GradCAM
from dicomnode.inference.registry import (
    CodedClass,
    ModelSpec,
    configure_devices,
    load_model,
    read_manifest,
)
from dicomnode.pipelines.base import InstanceInput, PipelineOutcome, StudyInput
from dicomnode.routing import Skipped, route_cxr

log = logging.getLogger("dicomnode.pipelines.cxr")

UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class ModelUsed:
    """Identity of a model that contributed to a result (for TID 4019 and audits)."""

    name: str
    version: str
    task: str
    device_uid: str
    sha256: str


@dataclass
class CXRImageResult:
    """The analysis of one radiograph, in its own pixel coordinates."""

    sop_instance_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    probabilities: dict[str, float]
    member_probabilities: dict[str, dict[str, float]]
    abnormal: bool
    lung_box: Box
    lung_found: bool
    boxes: list[Box]
    box_method: str
    """``detector:<model>``, ``gradcam-threshold``, or ``none`` (classified normal)."""
    explained_class: str
    explained_by: str
    """The member whose Grad-CAM this is."""
    heatmap: np.ndarray = field(repr=False)
    """Grad-CAM in [0, 1] over the lung crop (``lung_box``), at its own resolution."""

    def heatmap_in_source(self) -> np.ndarray:
        """The heat map placed in a (rows, columns) float32 image, zero outside the crop."""
        return map_in_source(self.heatmap, self.lung_box, self.rows, self.columns)

    def summary(self) -> dict[str, Any]:
        """JSON-ready essentials (no heat map)."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "abnormal": self.abnormal,
            "lung_box": _box_json(self.lung_box),
            "lung_found": self.lung_found,
            "boxes": [_box_json(b) for b in self.boxes],
            "box_method": self.box_method,
            "explained_class": self.explained_class,
            "explained_by": self.explained_by,
        }


@dataclass
class CXRStudyResult:
    """The analysis of a study: one result per analysed image, and what was skipped."""

    study_instance_uid: str
    images: list[CXRImageResult]
    skipped: list[Skipped]
    models: list[ModelUsed]
    strategy: str
    timings: dict[str, float]
    classes: list[CodedClass] = field(default_factory=list)
    """The members' classes in output order, with their codes (for the SR)."""

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": "cxr",
            "strategy": self.strategy,
            "images": [i.summary() for i in self.images],
            "skipped": [s.__dict__ for s in self.skipped],
            "models": [m.__dict__ for m in self.models],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


def _box_json(box: Box) -> dict[str, float | None]:
    return {
        "x": round(box.x, 2),
        "y": round(box.y, 2),
        "width": round(box.width, 2),
        "height": round(box.height, 2),
        "confidence": None if box.confidence is None else round(box.confidence, 4),
    }


def keep_largest(mask: np.ndarray, count: int = 2, min_fraction: float = 0.005) -> np.ndarray:
    """The ``count`` largest connected components of ``mask`` (tiny specks dropped)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:count] + 1
    floor = min_fraction * mask.size
    keep = [label for label in order if stats[label, cv2.CC_STAT_AREA] >= floor]
    return np.isin(labels, keep)


#: Probability at or above which a U-Net pixel is lung.
LUNG_THRESHOLD = 0.5


def lung_masks(
    images: Sequence[np.ndarray],
    spec: ModelSpec,
    predict: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Steps 2 of the pipeline: the lung masks of grey ``uint8`` images.

    Each image is resized (area) to the lung model's input, scaled by its manifest's
    ``scale``, predicted by ``predict`` (the lung U-Net, batched), thresholded at
    :data:`LUNG_THRESHOLD` and reduced to its two largest components
    (:func:`keep_largest`). The masks are at the U-Net's resolution. Training uses this
    same function, so the classifiers learn on the crops the node makes.
    """
    mh, mw = spec.input_size
    grey = (
        np.stack([cv2.resize(p, (mw, mh), interpolation=cv2.INTER_AREA) for p in images]).astype(
            np.float32
        )[..., None]
        * spec.scale
    )
    probability = np.asarray(predict(grey))[..., 0]
    return [keep_largest(p >= LUNG_THRESHOLD) for p in probability]


def lung_crop(pixels: np.ndarray, mask: np.ndarray, size: int) -> tuple[Box, np.ndarray, bool]:
    """Step 3 of the pipeline: ``(box, crop, lungs_found)`` of one grey ``uint8`` image.

    The box is the lungs' extent in ``mask`` relaxed by 5 % per side
    (:func:`~dicomnode.inference.geometry.lung_box`), mapped to the image's pixels; the
    crop is that box cut from ``pixels`` and resized to ``size`` x ``size``. Without lungs
    in the mask the box is the whole image (``lungs_found`` False).
    """
    mh, mw = mask.shape
    rows, columns = pixels.shape[:2]
    box = lung_box(mask)
    found = box is not None
    if box is None:
        box = Box(0, 0, mw, mh)  # no lung found: analyse the whole image
    source_box = box.scaled(columns / mw, rows / mh)
    return source_box, crop(pixels, source_box, size), found


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, step: str, started: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started


class CXRPipeline:
    """The seed method as a node pipeline; one per worker process, models loaded once."""

    name = "cxr"

    def __init__(self, settings: CXRSettings, routing: RoutingSettings) -> None:
        self.settings = settings
        self.routing = routing
        self.version = "1"
        self.specs: dict[str, ModelSpec] = {}
        self.models: dict[str, Any] = {}
        self.gradcam: GradCAM | None = None
        self.device = "not loaded"

    # ----------------------------------------------------------------------- loading

    def _spec(self, name: str) -> ModelSpec:
        spec = read_manifest(self.settings.models_dir / name / "manifest.toml")
        self.specs[name] = spec
        return spec

    def load(self) -> None:
        """Read and verify every manifest, load the models, build Grad-CAM, warm up."""
        s = self.settings
        self.device = configure_devices(s.mixed_precision)
        names = [s.lung_mask, *s.members]
        if s.strategy == "stacking":
            if not s.stacking:
                raise ConfigError([("cxr.stacking", "is required when cxr.strategy = stacking")])
            names.append(s.stacking)
        if s.detector:
            names.append(s.detector)
        for name in names:
            self.models[name] = load_model(self._spec(name))
        classes = [self.specs[m].class_names for m in s.members]
        if any(c != classes[0] for c in classes):
            raise ConfigError(
                [("cxr.members", f"members disagree on their classes and order: {classes}")]
            )
        self.classes = classes[0]
        for key, value in (("explain_class", s.explain_class), ("normal_class", s.normal_class)):
            if value not in self.classes:
                raise ConfigError([(f"cxr.{key}", f"{value!r} is not one of {self.classes}")])
        if s.strategy == "weighted":
            self.weights = [self.specs[m].ensemble_weight for m in s.members]
            if any(w is None for w in self.weights):
                raise ConfigError(
                    [
                        (
                            "cxr.members",
                            "weighted ensemble: every member manifest needs [ensemble] weight",
                        )
                    ]
                )
        explainer = s.explain_member or s.members[0]
        layer = self.specs[explainer].gradcam_layer
        if explainer not in s.members or not layer:
            raise ConfigError(
                [("cxr.explain_member", f"{explainer!r} must be a member with a [gradcam] layer")]
            )
        self.explainer = explainer
        self.gradcam = GradCAM(self.models[explainer], layer)
        self._warm_up()
        log.info("cxr pipeline ready on %s: %s", self.device, ", ".join(names))

    def _warm_up(self) -> None:
        """One prediction per model, so the first study does not pay for graph building."""
        for name, model in self.models.items():
            spec = self.specs[name]
            if spec.task == "stacking":
                shape = (1, model.input_shape[-1])
            else:
                shape = (1, *spec.input_size, spec.channels)
            model.predict(np.zeros(shape, np.float32), verbose=0)

    def models_used(self) -> list[ModelUsed]:
        return [
            ModelUsed(s.name, s.version, s.task, s.device_uid, s.sha256)
            for s in self.specs.values()
        ]

    # ----------------------------------------------------------------------- running

    def run(self, study: StudyInput) -> PipelineOutcome:
        result = self.analyse(study)
        reason = None
        if not result.images:
            reason = route_reason(result.skipped)
        return PipelineOutcome(summary=result.summary(), skipped_reason=reason, analysis=result)

    def analyse(self, study: StudyInput) -> CXRStudyResult:
        """The typed result for one study."""
        timer = _Timer()
        route = route_cxr(study.instances, self.routing)
        skipped = list(route.skipped)
        decoded: list[tuple[InstanceInput, Image8]] = []
        started = time.perf_counter()
        for instance in route.instances:
            try:
                decoded.append((instance, to_uint8(instance.path)))
            except (ImageDecodeError, OSError) as exc:
                skipped.append(Skipped(instance.sop_instance_uid, UNDECODABLE, str(exc)[:300]))
        timer.add("decode", started)
        images: list[CXRImageResult] = []
        for batch in _batches(decoded, self.settings.batch_size):
            images += self._analyse_batch(batch, timer)
        return CXRStudyResult(
            study_instance_uid=study.study_instance_uid,
            images=images,
            skipped=skipped,
            models=self.models_used(),
            strategy=self.settings.strategy,
            timings=timer.seconds,
            classes=list(self.specs[self.settings.members[0]].classes),
        )

    def _predict(self, name: str, batch: np.ndarray) -> np.ndarray:
        with metrics.inference(name):
            return np.asarray(self.models[name].predict(batch, verbose=0))

    def _analyse_batch(
        self, batch: Sequence[tuple[InstanceInput, Image8]], timer: _Timer
    ) -> list[CXRImageResult]:
        s = self.settings
        # Lung mask -------------------------------------------------------------
        started = time.perf_counter()
        masks = lung_masks(
            [img.pixels for _, img in batch],
            self.specs[s.lung_mask],
            lambda x: self._predict(s.lung_mask, x),
        )
        timer.add("lung_mask", started)

        # Lung crop -------------------------------------------------------------
        started = time.perf_counter()
        member_spec = self.specs[s.members[0]]
        cw = member_spec.input_size[1]  # square input (the seed: 256 x 256)
        lung_boxes, crops, found = [], [], []
        for (_, img), mask in zip(batch, masks, strict=True):
            source_box, pixels, lungs_found = lung_crop(img.pixels, mask, cw)
            found.append(lungs_found)
            lung_boxes.append(source_box)
            crops.append(pixels)
        crops_arr = np.stack(crops).astype(np.float32)[..., None] * member_spec.scale
        classifier_input = np.repeat(crops_arr, member_spec.channels, axis=-1)
        timer.add("lung_crop", started)

        # Ensemble --------------------------------------------------------------
        started = time.perf_counter()
        member_probs = np.stack([self._predict(m, classifier_input) for m in s.members])
        meta = (lambda x: self._predict(s.stacking, x)) if s.strategy == "stacking" else None
        combined = combine(
            member_probs,
            s.strategy,
            weights=self.weights if s.strategy == "weighted" else None,
            meta=meta,
        )
        timer.add("ensemble", started)

        # Grad-CAM --------------------------------------------------------------
        started = time.perf_counter()
        assert self.gradcam is not None
        cams = self.gradcam(classifier_input, self.classes.index(s.explain_class))
        timer.add("gradcam", started)

        normal = self.classes.index(s.normal_class)
        abnormal = [(1.0 - float(p[normal])) >= s.abnormal_threshold for p in combined]

        # Opacity boxes ---------------------------------------------------------
        started = time.perf_counter()
        detector_maps: list[np.ndarray | None] = [None] * len(batch)
        if s.detector and any(abnormal):
            det_spec = self.specs[s.detector]
            dh, dw = det_spec.input_size
            which = [i for i, a in enumerate(abnormal) if a]
            det_in = (
                np.stack(
                    [
                        cv2.resize(batch[i][1].pixels, (dw, dh), interpolation=cv2.INTER_AREA)
                        for i in which
                    ]
                ).astype(np.float32)[..., None]
                * det_spec.scale
            )
            det_in = np.repeat(det_in, det_spec.channels, axis=-1)
            for i, prob in zip(which, self._predict(s.detector, det_in)[..., 0], strict=True):
                detector_maps[i] = prob
        results = []
        for i, ((instance, img), mask) in enumerate(zip(batch, masks, strict=True)):
            lungs = cv2.resize(
                mask.astype(np.uint8), (img.Columns, img.Rows), interpolation=cv2.INTER_NEAREST
            ).astype(bool)
            result = CXRImageResult(
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                rows=img.Rows,
                columns=img.Columns,
                probabilities=dict(zip(self.classes, map(float, combined[i]), strict=True)),
                member_probabilities={
                    m: dict(zip(self.classes, map(float, member_probs[k, i]), strict=True))
                    for k, m in enumerate(s.members)
                },
                abnormal=abnormal[i],
                lung_box=lung_boxes[i],
                lung_found=found[i],
                boxes=[],
                box_method="none",
                explained_class=s.explain_class,
                explained_by=self.explainer,
                heatmap=cams[i],
            )
            if abnormal[i]:
                if detector_maps[i] is not None:
                    prob = resize_map(detector_maps[i], img.Columns, img.Rows)  # type: ignore[arg-type]
                    result.boxes = boxes_from_probability(prob, s.detector_threshold, lungs)
                    result.box_method = f"detector:{s.detector}"
                else:
                    heat = result.heatmap_in_source()
                    result.boxes = boxes_from_probability(heat, s.gradcam_box_threshold, lungs)
                    result.box_method = "gradcam-threshold"
            results.append(result)
        timer.add("boxes", started)
        return results


def route_reason(skipped: Sequence[Skipped]) -> str:
    """Why a study had nothing to analyse (coded, counted)."""
    from dicomnode.routing import Route

    return Route((), tuple(skipped)).reason or "no instances"
