"""The pipeline interface and the registry of pipelines by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicomnode.errors import ConfigError

if TYPE_CHECKING:
    from dicomnode.config import Settings


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


@dataclass(frozen=True)
class StudyInput:
    """Everything a pipeline may look at for one study."""

    study_instance_uid: str
    instances: tuple[InstanceInput, ...]


@dataclass(frozen=True)
class ResultObject:
    """An encoded DICOM object the pipeline produced (Part 10 file bytes)."""

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
    analysis: Any = None
    """The pipeline's typed result, for the result encoders (SR, SC)."""
    note: str | None = None
    """For an analysed study: what was left out and why (coded), shown by ``status``."""


class Pipeline(Protocol):
    """A study analysis. One instance per worker thread pool; ``load`` runs once."""

    name: str
    version: str

    def load(self) -> None:
        """Load models and warm them up (called once, before the first job)."""

    def run(self, study: StudyInput) -> PipelineOutcome:
        """Analyse one study. Raise to fail the attempt (it is retried)."""
        ...


def load_pipeline(spec: str, settings: Settings | None = None) -> Pipeline:
    """The pipeline named ``spec`` (built in), or ``module:callable`` returning one."""
    if spec == "placeholder":
        from dicomnode.pipelines.placeholder import PlaceholderPipeline

        return PlaceholderPipeline()
    if spec == "cxr":
        from dicomnode.pipelines.cxr import CXRPipeline

        if settings is None:
            raise ConfigError([("worker.pipeline", "the cxr pipeline needs the settings")])
        return CXRPipeline(settings.cxr, settings.routing)
    if spec in ("ct", "chest"):
        from dicomnode.pipelines.ct import CTPipeline

        if settings is None:
            raise ConfigError([("worker.pipeline", f"the {spec} pipeline needs the settings")])
        ct = CTPipeline(settings.ct)
        if spec == "ct":
            return ct
        from dicomnode.pipelines.chest import ChestPipeline
        from dicomnode.pipelines.cxr import CXRPipeline

        return ChestPipeline(CXRPipeline(settings.cxr, settings.routing), ct)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError([("worker.pipeline", f"cannot load {spec!r}: {exc}")]) from exc
        pipeline: Pipeline = factory()
        return pipeline
    raise ConfigError([("worker.pipeline", f"unknown pipeline {spec!r}")])
