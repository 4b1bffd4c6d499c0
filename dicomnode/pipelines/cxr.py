"""The chest X-ray pipeline (seed 000, with the detector advice of seeds 002/003).

For the frontal chest radiographs of a study (see :mod:`dicomnode.routing`), batched
over the study's images:

1. decode to the 8-bit grey image (:func:`dicomnode.imaging.to_uint8`);
2. lung mask: resize to the U-Net's input, /255, predict, threshold 0.5, keep the two
   largest components (the lungs);
3. each member's input (its manifest's ``[input] crop``): the lung crop (the mask's
   extent relaxed by 5 % per side, mapped to source pixels, cut from the source image) or
   the whole image; then its ``normalisation``, resized (area) to its input, scaled,
   grey repeated to 3 channels (:func:`dicomnode.inference.cxr_domain.model_input`);
4. ensemble: every member predicts; combined by the configured strategy (weighted
   average with the manifests' weights by default, or mean, majority vote, stacking);
   a member with a ``domain.npz`` (:class:`~dicomnode.inference.cxr_domain.DomainModel`)
   also gives its pooled features to the out-of-domain gate (an image scoring above the
   gate's threshold is "outside the validated domain": no findings, no boxes), and, when
   it is the only member, its operating points (each class Present at or above its own);
5. opacity boxes, only when the study looks abnormal (1 - P(normal) above a threshold):
   from the detector's probability map (threshold, connected components, one box per
   component, confidence = mean probability), kept inside the lungs; without a detector,
   from the Grad-CAM heat map thresholded inside the lungs; the result says which;
6. Grad-CAM of the explained class on the configured member's layer.

Everything ends in source-image pixels. The steps are those of :mod:`dicomnode.inference`
(lung, ensemble, detector, Grad-CAM), which training and evaluation call too; this module
only composes them. Models are loaded once by :meth:`load`; the worker threads of a
process share the pipeline, so every model call holds one lock (decoding, crops and boxes
run in parallel).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import metrics
from dicomnode.config import CXRSettings, RoutingSettings
from dicomnode.errors import ConfigError
from dicomnode.imaging import Image8, ImageDecodeError, to_uint8
from dicomnode.inference.cxr_domain import DOMAIN_FILE, DomainModel
from dicomnode.inference.detector import (
    BoxSettings,
    boxes_from_detector,
    boxes_from_heatmap,
    detector_input,
    source_lungs,
)
from dicomnode.inference.ensemble import classifier_input, combine, predict_members
from dicomnode.inference.geometry import Box
from dicomnode.inference.gradcam import GradCAM
from dicomnode.inference.lung import lung_crop, lung_masks
from dicomnode.inference.predict import Predictor
from dicomnode.inference.registry import (
    ModelSpec,
    configure_devices,
    load_model,
    read_manifest,
    use_mixed_precision,
)
from dicomnode.pipelines.types import (
    UNDECODABLE,
    CXRImageResult,
    CXRStudyResult,
    InstanceInput,
    ModelUsed,
    PipelineOutcome,
    Skipped,
    SourceImage,
    StudyInput,
)
from dicomnode.routing import route_cxr, route_reason

log = logging.getLogger("dicomnode.pipelines.cxr")


def decode_failure(exc: Exception, instance: InstanceInput) -> str:
    """Why ``instance`` could not be decoded: the decoder's whole message, the file named
    by its path relative to the data directory (not the absolute path)."""
    name = instance.relative_path or instance.path.name
    if isinstance(exc, ImageDecodeError):
        return exc.naming(name)
    if isinstance(exc, OSError):
        return f"cannot read {name}: {exc.strerror or exc}"
    return f"{name}: {exc}"


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
        self.predictors: dict[str, Predictor] = {}
        self.gradcam: GradCAM | None = None
        self.weights: list[float] | None = None
        self.box_settings = BoxSettings()
        self.device = "not loaded"
        self.domains: dict[str, DomainModel] = {}
        """Members with a ``domain.npz``: their out-of-domain gate (on pooled features)."""
        self.operating_points: dict[str, float] = {}
        """Each class's Present threshold (the single member's documented operating points)."""
        # Keras models and the Grad-CAM tape are not safe to call from two threads at
        # once; the worker threads share this pipeline, so model calls take turns.
        self._model_lock = threading.Lock()

    # ----------------------------------------------------------------------- loading

    def _spec(self, name: str) -> ModelSpec:
        spec = read_manifest(self.settings.models_dir / name / "manifest.toml")
        self.specs[name] = spec
        return spec

    def load(self) -> None:
        """Read and verify every manifest, load the models, build Grad-CAM, warm up."""
        s = self.settings
        self.device = configure_devices()
        mixed = use_mixed_precision(s.mixed_precision, self.device)
        names = [s.lung_mask, *s.members]
        if s.strategy == "stacking":
            if not s.stacking:
                raise ConfigError([("cxr.stacking", "is required when cxr.strategy = stacking")])
            names.append(s.stacking)
        if s.detector:
            names.append(s.detector)
        for name in names:
            self.models[name] = load_model(self._spec(name), mixed)
            self.predictors[name] = Predictor(self.models[name])
        for name in s.members:
            folder = self.settings.models_dir / name
            if (folder / DOMAIN_FILE).is_file():
                self._load_domain(name, folder)
        if len(s.members) == 1 and s.members[0] in self.domains:
            # Operating points describe one model's calibrated outputs, not an average.
            self.operating_points = dict(self.domains[s.members[0]].operating_points)
        if s.detector:
            try:
                self.box_settings = BoxSettings.from_table(self.specs[s.detector].postprocess)
            except (TypeError, ValueError) as exc:
                raise ConfigError([("cxr.detector", f"{s.detector!r}: {exc}")]) from None
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
            weights = [self.specs[m].ensemble_weight for m in s.members]
            self.weights = [w for w in weights if w is not None]
            if len(self.weights) != len(weights):
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

    def _load_domain(self, name: str, folder: Any) -> None:
        """The member's out-of-domain gate: its ``domain.npz`` and a second model giving
        the pooled features the gate was fitted on (same weights)."""
        from dicomnode.nets.mobilenet import POOLED_FEATURES_LAYER, pooled_feature_model

        try:
            domain = DomainModel.load(folder)
            features = pooled_feature_model(self.models[name])
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(
                [
                    (
                        "cxr.members",
                        f"{name!r}: its {DOMAIN_FILE} needs a {POOLED_FEATURES_LAYER!r} "
                        f"layer and readable arrays: {exc}",
                    )
                ]
            ) from None
        self.domains[name] = domain
        self.predictors[f"{name}:{POOLED_FEATURES_LAYER}"] = Predictor(features)

    def _warm_up(self) -> None:
        """One prediction per model (its one trace, valid for every batch size), so the
        first study does not pay for graph building."""
        for name, model in self.models.items():
            spec = self.specs[name]
            shape: tuple[int, ...]
            if spec.task == "stacking":
                shape = (1, model.input_shape[-1])
            else:
                shape = (1, *spec.input_size, spec.channels)
            self.predictors[name](np.zeros(shape, np.float32))
        for name in self.domains:
            spec = self.specs[name]
            self.predictors[self._features_key(name)](
                np.zeros((1, *spec.input_size, spec.channels), np.float32)
            )

    @staticmethod
    def _features_key(name: str) -> str:
        from dicomnode.nets.mobilenet import POOLED_FEATURES_LAYER

        return f"{name}:{POOLED_FEATURES_LAYER}"

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
        return PipelineOutcome(
            summary=result.summary(), skipped_reason=reason, analysis=result, note=result.note
        )

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
                detail = decode_failure(exc, instance)
                skipped.append(Skipped(instance.sop_instance_uid, UNDECODABLE, detail))
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
            operating_points=dict(self.operating_points),
        )

    def analyse_images(self, images: Sequence[tuple[str, Image8]]) -> list[CXRImageResult]:
        """The job's steps after decoding (lung mask, classifiers, gate, operating points,
        boxes, Grad-CAM) on already decoded images, each named by ``name`` (reported as its
        SOP Instance UID); no routing. ``dicomnode validate`` runs labelled files through it."""
        items = [
            (
                InstanceInput(
                    path=Path(name),
                    sop_instance_uid=name,
                    sop_class_uid="",
                    series_instance_uid="",
                    modality=None,
                    body_part_examined=None,
                    view_position=None,
                    image_type=None,
                    rows=image.Rows,
                    columns=image.Columns,
                ),
                image,
            )
            for name, image in images
        ]
        timer = _Timer()
        results: list[CXRImageResult] = []
        for batch in _batches(items, self.settings.batch_size):
            results += self._analyse_batch(batch, timer)
        return results

    def _findings(self, probabilities: dict[str, float]) -> dict[str, bool]:
        """Present/Absent per class at the operating points (none without them)."""
        if not self.operating_points:
            return {}
        return self.domains[self.settings.members[0]].findings(probabilities)

    def _predict(self, name: str, batch: np.ndarray) -> np.ndarray:
        with self._model_lock, metrics.inference(name):
            return self.predictors[name](batch)

    def _analyse_batch(
        self, batch: Sequence[tuple[InstanceInput, Image8]], timer: _Timer
    ) -> list[CXRImageResult]:
        s = self.settings
        started = time.perf_counter()
        masks = lung_masks(
            [img.pixels for _, img in batch],
            self.specs[s.lung_mask],
            lambda x: self._predict(s.lung_mask, x),
        )
        timer.add("lung_mask", started)

        started = time.perf_counter()
        lung_members = [m for m in s.members if self.specs[m].crop == "lung"]
        size = self.specs[(lung_members or s.members)[0]].input_size[1]
        crops = [
            lung_crop(img.pixels, mask, size) for (_, img), mask in zip(batch, masks, strict=True)
        ]
        inputs: dict[str, np.ndarray] = {}
        for m in s.members:
            spec = self.specs[m]
            views = (
                [img.pixels for _, img in batch]
                if spec.crop == "whole"
                else [pixels for _, pixels, _ in crops]
            )
            inputs[m] = classifier_input(views, spec)
        timer.add("lung_crop", started)

        started = time.perf_counter()
        member_probs = predict_members(
            [inputs[m] for m in s.members], [partial(self._predict, m) for m in s.members]
        )
        # The out-of-domain gate of every member that has one; an image's score is that
        # of the gate it exceeds most (relative to the gate's threshold).
        scores: dict[int, tuple[float, float]] = {}
        for m, domain in self.domains.items():
            pooled = self._predict(self._features_key(m), inputs[m])
            threshold = domain.gate.threshold
            for i, score in enumerate(map(float, domain.gate.score(pooled))):
                if i not in scores or score / threshold > scores[i][0] / scores[i][1]:
                    scores[i] = (score, threshold)
        meta = (lambda b: self._predict(s.stacking, b)) if s.strategy == "stacking" else None
        combined = combine(
            member_probs,
            s.strategy,
            weights=self.weights if s.strategy == "weighted" else None,
            meta=meta,
        )
        timer.add("ensemble", started)

        started = time.perf_counter()
        assert self.gradcam is not None
        with self._model_lock:
            cams = self.gradcam(inputs[self.explainer], self.classes.index(s.explain_class))
        timer.add("gradcam", started)

        normal = self.classes.index(s.normal_class)
        outside = [i in scores and scores[i][0] > scores[i][1] for i in range(len(batch))]
        abnormal = [
            (1.0 - float(p[normal])) >= s.abnormal_threshold and not out
            for p, out in zip(combined, outside, strict=True)
        ]

        started = time.perf_counter()
        detector_maps: dict[int, np.ndarray] = {}
        wanted = [
            (a or not s.ensemble_gates_detector) and not out
            for a, out in zip(abnormal, outside, strict=True)
        ]
        if s.detector and any(wanted):
            which = [i for i, a in enumerate(wanted) if a]
            det_in = detector_input([batch[i][1].pixels for i in which], self.specs[s.detector])
            for i, prob in zip(which, self._predict(s.detector, det_in)[..., 0], strict=True):
                detector_maps[i] = prob
        results = []
        for i, ((instance, img), mask) in enumerate(zip(batch, masks, strict=True)):
            lung_box, _, lungs_found = crops[i]
            probabilities = dict(zip(self.classes, map(float, combined[i]), strict=True))
            whole = self.specs[self.explainer].crop == "whole"
            result = CXRImageResult(
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                rows=img.Rows,
                columns=img.Columns,
                probabilities=probabilities,
                member_probabilities={
                    m: dict(zip(self.classes, map(float, member_probs[k, i]), strict=True))
                    for k, m in enumerate(s.members)
                },
                abnormal=abnormal[i],
                lung_box=lung_box,
                lung_found=lungs_found,
                boxes=[],
                box_method="none",
                explained_class=s.explain_class,
                explained_by=self.explainer,
                heatmap=cams[i],
                source=None if img.header is None else SourceImage(img.header, img.pixels),
                lung_mask=np.asarray(mask, bool),
                opacity_map=detector_maps.get(i),
                classified_box=Box(0, 0, img.Columns, img.Rows) if whole else None,
                findings={} if outside[i] else self._findings(probabilities),
                domain_score=scores[i][0] if i in scores else None,
                domain_threshold=scores[i][1] if i in scores else None,
            )
            if i in detector_maps:
                lungs = source_lungs(mask, img.Rows, img.Columns)
                result.boxes = boxes_from_detector(detector_maps[i], lungs, self.box_settings)
                result.box_method = f"detector:{s.detector}"
            elif abnormal[i] and not s.detector and s.gradcam_boxes:
                lungs = source_lungs(mask, img.Rows, img.Columns)
                result.boxes = boxes_from_heatmap(
                    result.heatmap_in_source(), lungs, s.gradcam_box_threshold
                )
                result.box_method = "gradcam-threshold"
            results.append(result)
        timer.add("boxes", started)
        return results
