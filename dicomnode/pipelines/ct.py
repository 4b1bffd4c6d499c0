"""The chest CT pipeline (seed 001): a DenseNet-121 slice classifier after a lung mask.

For a study's CT instances:

1. **series selection** (:func:`dicomnode.routing.select_ct_series`): slice headers
   are read without pixel data; the axial chest series is chosen (localizers,
   reformats, non-axial and non-chest series skipped, the thinnest complete series
   preferred), every other series is recorded with a coded reason;
2. **assembly** (:func:`dicomnode.volume.assemble`): slices ordered along the normal,
   duplicates dropped, gaps recorded;
3. **streaming**, one slice at a time in a small thread pool: decode and Hounsfield
   units (:func:`dicomnode.imaging.to_hu`, any transfer syntax), lung mask (the
   classical HU method of :func:`dicomnode.inference.ct.lung_mask_hu`, or a lung-mask
   model), and, for slices whose lung fraction reaches ``min_lung_fraction``, the
   classifier's input as a uint8 crop (:func:`dicomnode.inference.ct.lung_crop_uint8`).
   Only the crops (``size`` bytes each) and a few numbers per slice are kept, never the
   volume: memory stays bounded for series of 1,000+ slices;
4. **classification** in batches of ``batch_size`` as crops accumulate: P(finding) per slice;
5. **study score** by the configured aggregation (max, mean of the top k, percentile),
   positive when at least the manifest's ``threshold``;
6. **Grad-CAM** on the ``evidence_slices`` most probable slices, re-read from disk.

DICOM I/O is limited to reading files; the result objects are made by
:mod:`dicomnode.results.encode`. Models are loaded once by :meth:`CTPipeline.load`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from dicomnode import metrics
from dicomnode.config import CTSettings
from dicomnode.errors import ConfigError
from dicomnode.imaging import ImageDecodeError, to_hu
from dicomnode.inference.ct import (
    GAS_HU,
    LungMask,
    aggregate,
    body_mask,
    lung_crop_uint8,
    lung_mask_hu,
    to_model_input,
    window_uint8,
)
from dicomnode.inference.geometry import Box, lung_box, map_in_source
from dicomnode.inference.gradcam import GradCAM
from dicomnode.inference.registry import (
    DEFAULT_CT_WINDOW,
    CodedClass,
    ModelSpec,
    configure_devices,
    load_model,
    read_manifest,
)
from dicomnode.pipelines.base import InstanceInput, PipelineOutcome, StudyInput
from dicomnode.pipelines.cxr import ModelUsed, keep_largest
from dicomnode.routing import CTSelection, Skipped, is_ct_candidate, select_ct_series
from dicomnode.volume import OrderedSlice, read_slice_header

log = logging.getLogger("dicomnode.pipelines.ct")

UNDECODABLE = "undecodable"
NO_LUNG = "no-lung"
#: The lung-mask method name when no model is configured.
HU_THRESHOLD_METHOD = "hu-threshold"
#: Decision threshold when the classifier's manifest has none.
DEFAULT_THRESHOLD = 0.5
#: Slices handed to the reading threads at a time (bounds the crops waiting for the model).
_CHUNK = 64


@dataclass
class CTSliceResult:
    """One analysed slice, in its own pixel coordinates (an evidence slice has a heat map)."""

    sop_instance_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    instance_number: int | None
    position_mm: float | None
    probability: float
    lung_fraction: float
    lung_box: Box
    lung_found: bool
    explained_class: str
    heatmap: np.ndarray | None = field(default=None, repr=False)
    """Grad-CAM in [0, 1] over ``lung_box`` at the layer's resolution (evidence slices)."""
    boxes: list[Box] = field(default_factory=list)
    """No finding boxes on CT (the SC renderer draws none)."""

    def heatmap_in_source(self) -> np.ndarray:
        """The heat map placed in a (rows, columns) float32 image, zero outside the crop."""
        if self.heatmap is None:
            return np.zeros((self.rows, self.columns), np.float32)
        return map_in_source(self.heatmap, self.lung_box, self.rows, self.columns)

    def summary(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
            "position_mm": None if self.position_mm is None else round(self.position_mm, 3),
            "probability": round(self.probability, 6),
            "lung_fraction": round(self.lung_fraction, 4),
            "lung_box": [round(v, 1) for v in _xy(self.lung_box)],
        }


def _xy(box: Box) -> tuple[float, float, float, float]:
    return (box.x, box.y, box.width, box.height)


@dataclass
class CTStudyResult:
    """The analysis of a CT study: the chosen series, the study score and its evidence."""

    study_instance_uid: str
    selection: CTSelection
    finding: CodedClass
    aggregation: str
    aggregation_parameters: dict[str, float]
    threshold: float
    window: tuple[float, float]
    lung_mask_method: str
    models: list[ModelUsed]
    lung_mask_parameters: list[str] = field(default_factory=list)
    score: float | None = None
    positive: bool | None = None
    slices_read: int = 0
    slice_probabilities: list[tuple[str, float]] = field(default_factory=list)
    """(SOPInstanceUID, probability) of every classified slice, in series order."""
    evidence: list[CTSliceResult] = field(default_factory=list)
    """The most probable slices, highest first, each with its Grad-CAM."""
    skipped_slices: list[Skipped] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def series_instance_uid(self) -> str | None:
        s = self.selection.series
        return None if s is None else s.series_instance_uid

    @property
    def reason(self) -> str | None:
        """Why nothing was classified (coded), None when a score was made."""
        if self.score is not None:
            return None
        if self.selection.series is None:
            return self.selection.reason
        counts: dict[str, int] = {}
        for s in self.skipped_slices:
            counts[s.code] = counts.get(s.code, 0) + 1
        parts = ", ".join(f"{n} {code}" for code, n in sorted(counts.items()))
        return f"no slice of the chosen CT series could be classified: {parts or 'no slices'}"

    @property
    def note(self) -> str | None:
        """For an analysed study, what was left out (coded counts), else None."""
        if self.score is None:
            return None
        parts = []
        series = Counter(s.code for s in self.selection.skipped)
        if series:
            parts.append(
                "skipped series: " + ", ".join(f"{n} {c}" for c, n in sorted(series.items()))
            )
        slices = Counter(s.code for s in self.skipped_slices)
        if slices:
            parts.append(
                "slices not classified: " + ", ".join(f"{n} {c}" for c, n in sorted(slices.items()))
            )
        if not parts:
            return None
        return f"ct: {len(self.slice_probabilities)} of {self.slices_read} slices classified; " + (
            "; ".join(parts)
        )

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in self.skipped_slices:
            counts[s.code] = counts.get(s.code, 0) + 1
        return {
            "pipeline": "ct",
            "selection": self.selection.summary(),
            "finding": self.finding.name,
            "score": None if self.score is None else round(self.score, 6),
            "positive": self.positive,
            "threshold": self.threshold,
            "aggregation": self.aggregation,
            "aggregation_parameters": self.aggregation_parameters,
            "window": list(self.window),
            "lung_mask": self.lung_mask_method,
            "slices_read": self.slices_read,
            "slices_classified": len(self.slice_probabilities),
            "slices_skipped": counts,
            "undecodable": [s.__dict__ for s in self.skipped_slices if s.code == UNDECODABLE][:20],
            "slice_probabilities": [round(p, 4) for _, p in self.slice_probabilities],
            "evidence": [e.summary() for e in self.evidence],
            "models": [m.__dict__ for m in self.models],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class _SliceRecord:
    """What is kept of a slice between reading and the end of the study (small)."""

    ordered: OrderedSlice
    fraction: float
    box: Box | None
    crop: np.ndarray | None
    error: str | None = None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, step: str, started: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[step] = self.seconds.get(step, 0.0) + now - started
        return now


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CTPipeline:
    """Seed 001 as a node pipeline; one per worker process, models loaded once."""

    name = "ct"

    def __init__(self, settings: CTSettings, threads: int | None = None) -> None:
        self.settings = settings
        self.version = "1"
        self.specs: dict[str, ModelSpec] = {}
        self.models: dict[str, Any] = {}
        self.gradcam: GradCAM | None = None
        self.device = "not loaded"
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._predict_lock = threading.Lock()

    # ----------------------------------------------------------------------- loading

    def _spec(self, name: str, task: str, key: str) -> ModelSpec:
        spec = read_manifest(self.settings.models_dir / name / "manifest.toml")
        if spec.task != task:
            raise ConfigError(
                [(f"ct.{key}", f"model {name!r} has task {spec.task!r}, expected {task!r}")]
            )
        self.specs[name] = spec
        return spec

    def load(self) -> None:
        """Read and verify the manifests, load the models, build Grad-CAM, warm up."""
        s = self.settings
        self.device = configure_devices(s.mixed_precision)
        spec = self._spec(s.classifier, "ct-classifier", "classifier")
        if not spec.gradcam_layer:
            raise ConfigError([("ct.classifier", f"model {s.classifier!r} has no [gradcam] layer")])
        if len(spec.classes) != 1:
            raise ConfigError(
                [
                    (
                        "ct.classifier",
                        f"model {s.classifier!r} needs one [[classes]] entry (the finding its "
                        f"sigmoid output gives), got {len(spec.classes)}",
                    )
                ]
            )
        self.classifier = spec
        self.models[s.classifier] = load_model(spec)
        if s.lung_mask:
            self.models[s.lung_mask] = load_model(self._spec(s.lung_mask, "lung-mask", "lung_mask"))
        self.gradcam = GradCAM(self.models[s.classifier], spec.gradcam_layer)
        # Warm up with the shapes the studies use (classifier batches, one mask at a time).
        for name, model in self.models.items():
            model_spec = self.specs[name]
            batch = s.batch_size if name == s.classifier else 1
            model.predict(
                np.zeros((batch, *model_spec.input_size, model_spec.channels), np.float32),
                batch_size=batch,
                verbose=0,
            )
        log.info("ct pipeline ready on %s: %s", self.device, ", ".join(self.models))

    def models_used(self) -> list[ModelUsed]:
        return [
            ModelUsed(s.name, s.version, s.task, s.device_uid, s.sha256)
            for s in self.specs.values()
        ]

    @property
    def window(self) -> tuple[float, float]:
        return self.classifier.window or DEFAULT_CT_WINDOW

    # ----------------------------------------------------------------------- running

    def run(self, study: StudyInput) -> PipelineOutcome:
        result = self.analyse(study)
        return PipelineOutcome(
            summary=result.summary(),
            skipped_reason=result.reason,
            analysis=result,
            note=result.note,
        )

    def analyse(self, study: StudyInput) -> CTStudyResult:
        """The typed result for one study (only its CT instances are looked at)."""
        s = self.settings
        timer = _Timer()
        started = time.perf_counter()
        selection = select_ct_series(
            study.instances, lambda instance: read_slice_header(instance.path), s.selection
        )
        timer.add("select", started)
        spec = self.classifier
        result = CTStudyResult(
            study_instance_uid=study.study_instance_uid,
            selection=selection,
            finding=spec.classes[0],
            aggregation=s.aggregation,
            aggregation_parameters=(
                {"top_k": s.top_k}
                if s.aggregation == "top_k_mean"
                else {"percentile": s.percentile}
                if s.aggregation == "percentile"
                else {}
            ),
            threshold=spec.threshold if spec.threshold is not None else DEFAULT_THRESHOLD,
            window=self.window,
            lung_mask_method=f"model:{s.lung_mask}" if s.lung_mask else HU_THRESHOLD_METHOD,
            models=self.models_used(),
            lung_mask_parameters=(
                []
                if s.lung_mask
                else [
                    f"air below {s.lung_threshold_hu:g} HU inside the body",
                    f"gas regions (median below {GAS_HU:g} HU) removed",
                ]
            ),
            timings=timer.seconds,
        )
        series = selection.series
        if series is None:
            return result
        records = self._classify_series(series.slices, result, timer)
        if result.slice_probabilities:
            probabilities = [p for _, p in result.slice_probabilities]
            result.score = aggregate(probabilities, s.aggregation, s.top_k, s.percentile)
            result.positive = result.score >= result.threshold
            result.evidence = self._evidence(records, result, timer)
        timer.add("total", started)
        log.info(
            "ct: %d slices read (%s), %d classified, score %s in %.1f s",
            result.slices_read,
            selection.why,
            len(result.slice_probabilities),
            "none" if result.score is None else f"{result.score:.4f}",
            timer.seconds["total"],
        )
        return result

    def _lung(self, hu: np.ndarray, spacing: tuple[float, float] | None) -> LungMask:
        s = self.settings
        if not s.lung_mask:
            return lung_mask_hu(hu, spacing, threshold=s.lung_threshold_hu)
        spec = self.specs[s.lung_mask]
        h, w = spec.input_size
        grey = window_uint8(hu, *self.window)
        x = to_model_input(
            cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)[None], spec.channels, spec.scale
        )
        with self._predict_lock, metrics.inference(s.lung_mask):
            probability = np.asarray(self.models[s.lung_mask].predict(x, verbose=0))[0, ..., 0]
        small = keep_largest(probability >= 0.5)
        mask = cv2.resize(
            small.astype(np.uint8), (hu.shape[1], hu.shape[0]), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
        body = int(body_mask(hu).sum())
        return LungMask(mask, float(mask.sum()) / body if body else 0.0, lung_box(mask))

    def _read(self, ordered: OrderedSlice, timer: _Timer) -> _SliceRecord:
        """Decode, mask and crop one slice (runs in the reading threads)."""
        started = time.perf_counter()
        try:
            hu = to_hu(ordered.header.path)
        except (ImageDecodeError, OSError) as exc:
            return _SliceRecord(ordered, 0.0, None, None, str(exc)[:300])
        started = timer.add("decode", started)
        lung = self._lung(hu, ordered.header.PixelSpacing)
        started = timer.add("lung_mask", started)
        crop = None
        if lung.box is not None and lung.fraction >= self.settings.min_lung_fraction:
            crop = lung_crop_uint8(hu, lung.box, self.classifier.input_size, self.window)
        timer.add("prepare", started)
        return _SliceRecord(ordered, lung.fraction, lung.box, crop)

    def _predict(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """P(finding) of each crop. A short batch is padded to ``batch_size`` so that the
        model always sees one input shape (no retracing for each study's last batch)."""
        spec = self.classifier
        size = self.settings.batch_size
        batch = np.zeros((max(size, len(crops)), *spec.input_size), np.uint8)
        batch[: len(crops)] = np.stack(crops)
        x = to_model_input(batch, spec.channels, spec.scale)
        with self._predict_lock, metrics.inference(self.settings.classifier):
            out = self.models[self.settings.classifier].predict(x, batch_size=size, verbose=0)
        return np.asarray(out, dtype=np.float64).reshape(len(batch), -1)[: len(crops), 0]

    def _classify_series(
        self, slices: Sequence[OrderedSlice], result: CTStudyResult, timer: _Timer
    ) -> list[_SliceRecord]:
        """Stream the series: read in threads, classify in batches; keep small records."""
        records: list[_SliceRecord] = []
        pending: list[_SliceRecord] = []

        def flush() -> None:
            started = time.perf_counter()
            probabilities = self._predict([r.crop for r in pending])  # type: ignore[misc]
            for record, p in zip(pending, probabilities, strict=True):
                result.slice_probabilities.append((record.ordered.header.SOPInstanceUID, float(p)))
                record.crop = None  # the crop is not needed any more
            pending.clear()
            timer.add("classify", started)

        with ThreadPoolExecutor(self.threads, thread_name_prefix="ct-read") as pool:
            for chunk in _chunks(slices, _CHUNK):
                for record in pool.map(lambda o: self._read(o, timer), chunk):
                    result.slices_read += 1
                    uid = record.ordered.header.SOPInstanceUID
                    if record.error is not None:
                        result.skipped_slices.append(Skipped(uid, UNDECODABLE, record.error))
                    elif record.crop is None:
                        result.skipped_slices.append(
                            Skipped(uid, NO_LUNG, f"lung fraction {record.fraction:.3f}")
                        )
                    else:
                        pending.append(record)
                    records.append(record)
                    if len(pending) >= self.settings.batch_size:
                        flush()
        if pending:
            flush()
        return records

    def _evidence(
        self, records: Sequence[_SliceRecord], result: CTStudyResult, timer: _Timer
    ) -> list[CTSliceResult]:
        """The most probable slices with their Grad-CAM (re-read: nothing was kept)."""
        started = time.perf_counter()
        by_uid = {r.ordered.header.SOPInstanceUID: r for r in records}
        top = sorted(result.slice_probabilities, key=lambda item: -item[1])
        top = top[: self.settings.evidence_slices]
        crops, chosen = [], []
        for uid, probability in top:
            record = by_uid[uid]
            hu = to_hu(record.ordered.header.path)
            crops.append(lung_crop_uint8(hu, record.box, self.classifier.input_size, self.window))
            chosen.append((record, probability))
        spec = self.classifier
        assert self.gradcam is not None
        with self._predict_lock:
            cams = self.gradcam(to_model_input(np.stack(crops), spec.channels, spec.scale), 0)
        evidence = []
        for (record, probability), cam in zip(chosen, cams, strict=True):
            h = record.ordered.header
            assert record.box is not None
            evidence.append(
                CTSliceResult(
                    sop_instance_uid=h.SOPInstanceUID,
                    sop_class_uid=h.SOPClassUID,
                    rows=h.Rows,
                    columns=h.Columns,
                    instance_number=h.InstanceNumber,
                    position_mm=record.ordered.position,
                    probability=probability,
                    lung_fraction=record.fraction,
                    lung_box=record.box,
                    lung_found=True,
                    explained_class=result.finding.name,
                    heatmap=cam,
                )
            )
        timer.add("gradcam", started)
        return evidence


def ct_instances(study: StudyInput, pipeline: CTPipeline) -> tuple[InstanceInput, ...]:
    """The study's instances the CT pipeline looks at (by Modality)."""
    return tuple(i for i in study.instances if is_ct_candidate(i, pipeline.settings.selection))
