"""The typed values that flow between the stages (a leaf module).

Data flows one way: the worker reads the index into a :class:`StudyInput`, a pipeline
turns it into a :class:`PipelineOutcome` whose ``analysis`` is one of the typed study
results below, and the result encoders (:mod:`dicomnode.results.encode`, chosen by the
analysis' type) turn that into :class:`ResultObject` s for the outbox.

This module holds data only. It imports no pipeline, encoder, worker or queue module;
its project imports are the data types of the lower layers (a box from
:mod:`dicomnode.inference.box`, a coded class from :mod:`dicomnode.inference.registry`,
a CT series from :mod:`dicomnode.volume`), which import none of those either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dicomnode.inference.box import Box
from dicomnode.inference.registry import CodedClass

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from dicomnode.volume import CTSeries

#: Skip reason of an instance or slice whose pixels cannot be decoded.
UNDECODABLE = "undecodable"
#: Skip reason of a CT slice with too little lung.
NO_LUNG = "no-lung"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InstanceInput:
    """One stored instance of the study, with the tags the index keeps."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    view_position: str | None
    image_type: str | None
    rows: int | None
    columns: int | None
    series_description: str | None = None
    view_evidence: str | None = None
    study_description: str | None = None
    relative_path: str | None = None
    """The file's path relative to the data directory (how messages name it)."""


@dataclass(frozen=True)
class StudyInput:
    """Everything a pipeline may look at for one study."""

    study_instance_uid: str
    instances: tuple[InstanceInput, ...]


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Skipped:
    """An instance a pipeline does not analyse, with a coded reason."""

    sop_instance_uid: str
    code: str
    detail: str


@dataclass(frozen=True)
class SeriesSkipped:
    """A series the CT pipeline does not analyse, with a coded reason."""

    series_instance_uid: str
    code: str
    detail: str
    instances: int


def summarise_skips(skipped: Sequence[Skipped | SeriesSkipped]) -> str:
    """What was left out, by code: ``"<count> <code> (<first detail>); ..."``."""
    counts = Counter(s.code for s in skipped)
    examples: dict[str, str] = {}
    for s in skipped:
        examples.setdefault(s.code, s.detail)
    return "; ".join(f"{n} {code} ({examples[code]})" for code, n in sorted(counts.items()))


@dataclass(frozen=True)
class CTSelection:
    """The series chosen for analysis (if any), why, and every other series with its reason."""

    series: CTSeries | None
    why: str
    skipped: tuple[SeriesSkipped, ...]

    @property
    def reason(self) -> str | None:
        """Why nothing is analysed, summarised by code (None when a series was chosen)."""
        if self.series is not None:
            return None
        if not self.skipped:
            return "no axial chest CT series: no CT instances"
        return "no axial chest CT series: " + summarise_skips(self.skipped)

    def summary(self) -> dict[str, object]:
        """JSON-ready: the chosen series and every skipped one (coded)."""
        return {
            "chosen": None if self.series is None else self.series.summary(),
            "why": self.why,
            "skipped_series": [s.__dict__ for s in self.skipped],
        }


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelUsed:
    """Identity of a model that contributed to a result (for TID 4019 and audits)."""

    name: str
    version: str
    task: str
    device_uid: str
    sha256: str


@dataclass
class SourceImage:
    """What the encoders need of an analysed source image, read once by the pipeline.

    ``header`` is the source data set without its pixel data (the SR's and the SC's
    patient, study and frame of reference attributes); ``display`` is the grey ``uint8``
    image the overlay is drawn on (the radiograph as the model saw it; a CT slice in the
    classifier's window). The encoders never open the source file again.
    """

    header: Dataset = field(repr=False)
    display: np.ndarray = field(repr=False)


def _box_json(box: Box) -> dict[str, float | None]:
    return {
        "x": round(box.x, 2),
        "y": round(box.y, 2),
        "width": round(box.width, 2),
        "height": round(box.height, 2),
        "confidence": None if box.confidence is None else round(box.confidence, 4),
    }


#: Code of an analysed image the out-of-domain gate flags (``status`` note, job summary).
OUTSIDE_DOMAIN = "outside-validated-domain"


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
    source: SourceImage | None = field(default=None, repr=False)
    """The source header and display image, for the encoders."""
    lung_mask: np.ndarray | None = field(default=None, repr=False)
    """The lung model's boolean mask at its own resolution (the SEG's lung segment)."""
    opacity_map: np.ndarray | None = field(default=None, repr=False)
    """The detector's probability map at its output resolution, when it ran."""
    classified_box: Box | None = None
    """The region the classifiers and Grad-CAM saw when it is not ``lung_box``: the whole
    image for a ``crop = "whole"`` model."""
    findings: dict[str, bool] = field(default_factory=dict)
    """Present (True) / Absent per class with an operating point (empty without them)."""
    domain_score: float | None = None
    """The out-of-domain gate's score (> ``domain_threshold``: outside), None without a gate."""
    domain_threshold: float | None = None

    @property
    def outside_domain(self) -> bool:
        """True when the gate says this image is unlike the images the model was validated on."""
        return (
            self.domain_score is not None
            and self.domain_threshold is not None
            and self.domain_score > self.domain_threshold
        )

    @property
    def heatmap_box(self) -> Box:
        """The region of the source image the heat map covers."""
        return self.classified_box or self.lung_box

    def heatmap_in_source(self) -> np.ndarray:
        """The heat map placed in a (rows, columns) float32 image, zero outside its region."""
        from dicomnode.inference.geometry import map_in_source  # OpenCV: workers only

        return map_in_source(self.heatmap, self.heatmap_box, self.rows, self.columns)

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
            "findings": dict(self.findings),
            "domain_score": None if self.domain_score is None else round(self.domain_score, 4),
            "outside_domain": self.outside_domain,
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
    operating_points: dict[str, float] = field(default_factory=dict)
    """Calibrated probability at or above which each class is Present (the model's
    documented operating points; empty when the configured models document none)."""

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": "cxr",
            "strategy": self.strategy,
            "operating_points": dict(self.operating_points),
            "images": [i.summary() for i in self.images],
            "skipped": [s.__dict__ for s in self.skipped],
            "models": [m.__dict__ for m in self.models],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @property
    def note(self) -> str | None:
        """For an analysed study, the images left out (coded counts) and those outside the
        validated domain (``outside-validated-domain``: no findings reported), else None."""
        if not self.images:
            return None
        parts = []
        if self.skipped:
            codes = Counter(s.code for s in self.skipped)
            parts.append(
                "skipped images: " + ", ".join(f"{n} {c}" for c, n in sorted(codes.items()))
            )
        outside = sum(1 for i in self.images if i.outside_domain)
        if outside:
            parts.append(
                f"{outside} {OUTSIDE_DOMAIN} (image unlike the validated images; "
                "no findings reported)"
            )
        return "cxr: " + "; ".join(parts) if parts else None


def _xy(box: Box) -> tuple[float, float, float, float]:
    return (box.x, box.y, box.width, box.height)


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
    source: SourceImage | None = field(default=None, repr=False)
    """The slice's header and its image in the classifier's window, for the encoders."""

    @property
    def heatmap_box(self) -> Box:
        """The region of the source slice the heat map covers (the lung crop)."""
        return self.lung_box

    def heatmap_in_source(self) -> np.ndarray:
        """The heat map placed in a (rows, columns) float32 image, zero outside the crop."""
        if self.heatmap is None:
            return np.zeros((self.rows, self.columns), np.float32)
        from dicomnode.inference.geometry import map_in_source  # OpenCV: workers only

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
        counts = Counter(s.code for s in self.skipped_slices)
        parts = ", ".join(f"{n} {code}" for code, n in sorted(counts.items()))
        return f"no slice of the chosen CT series could be classified: {parts or 'no slices'}"

    @property
    def note(self) -> str | None:
        """For an analysed study, what was left out or irregular (coded counts), else None.

        Slices dropped as duplicates and gaps in the chosen series are named here too,
        so that ``status`` shows them, not only the job summary.
        """
        if self.score is None:
            return None
        parts = []
        series = Counter(s.code for s in self.selection.skipped)
        if series:
            parts.append(
                "skipped series: " + ", ".join(f"{n} {c}" for c, n in sorted(series.items()))
            )
        chosen = self.selection.series
        if chosen is not None and chosen.duplicates:
            parts.append(f"{len(chosen.duplicates)} duplicate slice(s) dropped")
        if chosen is not None and chosen.gaps:
            widest = max(g.distance_mm for g in chosen.gaps)
            parts.append(f"{len(chosen.gaps)} gap(s) in the series (widest {widest:.1f} mm)")
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
        counts = Counter(s.code for s in self.skipped_slices)
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
            "slices_skipped": dict(counts),
            "undecodable": [s.__dict__ for s in self.skipped_slices if s.code == UNDECODABLE][:20],
            "slice_probabilities": [round(p, 4) for _, p in self.slice_probabilities],
            "evidence": [e.summary() for e in self.evidence],
            "models": [m.__dict__ for m in self.models],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }


@dataclass
class ChestStudyResult:
    """The radiograph and CT analyses of one study (either may be absent)."""

    study_instance_uid: str
    cxr: CXRStudyResult | None = None
    ct: CTStudyResult | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def analysed(self) -> bool:
        return bool(self.cxr and self.cxr.images) or bool(self.ct and self.ct.score is not None)

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": "chest",
            "cxr": None if self.cxr is None else self.cxr.summary(),
            "ct": None if self.ct is None else self.ct.summary(),
        }


#: Every typed study result a pipeline may hand to the encoders.
StudyAnalysis = CXRStudyResult | CTStudyResult | ChestStudyResult


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class ResultObject:
    """An encoded DICOM object (Part 10 file bytes) for the outbox."""

    sop_instance_uid: str
    sop_class_uid: str
    data: bytes


@dataclass(frozen=True)
class PipelineOutcome:
    """What a pipeline returns for a study."""

    results: tuple[ResultObject, ...] = ()
    summary: dict[str, Any] = field(default_factory=dict)
    skipped_reason: str | None = None
    """Set when the study holds nothing this pipeline analyses."""
    analysis: StudyAnalysis | None = None
    """The pipeline's typed result, for the result encoders (SR, SC)."""
    note: str | None = None
    """For an analysed study: what was left out and why (coded), shown by ``status``."""


class Pipeline(Protocol):
    """A study analysis. One instance per worker process, shared by its threads;
    ``load`` runs once, ``run`` must be safe to call from several threads at once."""

    name: str
    version: str

    def load(self) -> None:
        """Load models and warm them up (called once, before the first job)."""

    def run(self, study: StudyInput) -> PipelineOutcome:
        """Analyse one study. Raise to fail the attempt (see :mod:`dicomnode.errors`
        for which exceptions are retried)."""
        ...
