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
6. **Grad-CAM** on the ``evidence_slices`` most probable slices, re-read from disk; their
   headers and their images in the classifier's window go forward to the encoders.

DICOM I/O is limited to reading files; the result objects are made by
:mod:`dicomnode.results.encode`. The steps are those of :mod:`dicomnode.inference.ct`
(which the CT recipe calls too); this module composes them. Models are loaded once by
:meth:`CTPipeline.load`; every model call holds one lock (the reading threads and the
worker threads share the models).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import metrics
from dicomnode.config import CTSettings
from dicomnode.errors import ConfigError
from dicomnode.imaging import ImageDecodeError, read_hu, to_hu
from dicomnode.inference.ct import (
    GAS_HU,
    LungMask,
    aggregate,
    classifier_batch,
    lung_crop_uint8,
    lung_mask_from_model,
    lung_mask_hu,
    lung_model_input,
    slice_probabilities,
    to_model_input,
    window_uint8,
)
from dicomnode.inference.geometry import Box
from dicomnode.inference.gradcam import GradCAM
from dicomnode.inference.registry import (
    DEFAULT_CT_WINDOW,
    ModelSpec,
    configure_devices,
    load_model,
    read_manifest,
    use_mixed_precision,
)
from dicomnode.pipelines.types import (
    NO_LUNG,
    UNDECODABLE,
    CTSliceResult,
    CTStudyResult,
    InstanceInput,
    ModelUsed,
    PipelineOutcome,
    Skipped,
    SourceImage,
    StudyInput,
)
from dicomnode.routing import is_ct_candidate, select_ct_series
from dicomnode.volume import OrderedSlice, read_slice_header

log = logging.getLogger("dicomnode.pipelines.ct")

#: The lung-mask method name when no model is configured.
HU_THRESHOLD_METHOD = "hu-threshold"
#: Decision threshold when the classifier's manifest has none.
DEFAULT_THRESHOLD = 0.5
#: Slices handed to the reading threads at a time (bounds the crops waiting for the model).
_CHUNK = 64


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
        self.device = configure_devices()
        mixed = use_mixed_precision(s.mixed_precision, self.device)
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
        self.models[s.classifier] = load_model(spec, mixed)
        if s.lung_mask:
            self.models[s.lung_mask] = load_model(
                self._spec(s.lung_mask, "lung-mask", "lung_mask"), mixed
            )
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
        names = {i.sop_instance_uid: i.relative_path for i in study.instances if i.relative_path}
        records = self._classify_series(series.slices, result, timer, names)
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
        x = lung_model_input(hu, self.specs[s.lung_mask], self.window)
        with self._predict_lock, metrics.inference(s.lung_mask):
            probability = np.asarray(self.models[s.lung_mask].predict(x, verbose=0))[0, ..., 0]
        return lung_mask_from_model(probability, hu)

    @staticmethod
    def _decode_failure(exc: Exception, ordered: OrderedSlice, names: dict[str, str]) -> str:
        """The decoder's whole message, the file named relative to the data directory."""
        uid = ordered.header.SOPInstanceUID
        name = names.get(uid) or Path(ordered.header.path).name
        if isinstance(exc, ImageDecodeError):
            return exc.naming(name)
        if isinstance(exc, OSError):
            return f"cannot read {name}: {exc.strerror or exc}"
        return f"{name}: {exc}"

    def _read(self, ordered: OrderedSlice, timer: _Timer, names: dict[str, str]) -> _SliceRecord:
        """Decode, mask and crop one slice (runs in the reading threads)."""
        started = time.perf_counter()
        try:
            hu = to_hu(ordered.header.path)
        except (ImageDecodeError, OSError) as exc:
            return _SliceRecord(ordered, 0.0, None, None, self._decode_failure(exc, ordered, names))
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
        size = self.settings.batch_size
        x = classifier_batch(crops, self.classifier, size)
        with self._predict_lock, metrics.inference(self.settings.classifier):
            out = self.models[self.settings.classifier].predict(x, batch_size=size, verbose=0)
        return slice_probabilities(out, len(crops))

    def _classify_series(
        self,
        slices: Sequence[OrderedSlice],
        result: CTStudyResult,
        timer: _Timer,
        names: dict[str, str],
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
                for record in pool.map(lambda o: self._read(o, timer, names), chunk):
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
        crops, chosen, sources = [], [], []
        for uid, probability in top:
            record = by_uid[uid]
            hu, header = read_hu(record.ordered.header.path)
            crops.append(lung_crop_uint8(hu, record.box, self.classifier.input_size, self.window))
            chosen.append((record, probability))
            sources.append(SourceImage(header, window_uint8(hu, *self.window)))
        spec = self.classifier
        assert self.gradcam is not None
        with self._predict_lock:
            cams = self.gradcam(to_model_input(np.stack(crops), spec.channels, spec.scale), 0)
        evidence = []
        for (record, probability), cam, source in zip(chosen, cams, sources, strict=True):
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
                    source=source,
                )
            )
        timer.add("gradcam", started)
        return evidence


def ct_instances(study: StudyInput, pipeline: CTPipeline) -> tuple[InstanceInput, ...]:
    """The study's instances the CT pipeline looks at (by Modality)."""
    return tuple(i for i in study.instances if is_ct_candidate(i, pipeline.settings.selection))
