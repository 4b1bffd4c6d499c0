"""Pipelines: what a worker runs for one study.

A pipeline receives a :class:`StudyInput` (file paths and index tags, no open
database, no network) and returns a :class:`PipelineOutcome` whose ``analysis`` is a
typed study result (:mod:`dicomnode.pipelines.types`); the result encoders turn it
into DICOM objects. Models are loaded once by :meth:`Pipeline.load` and stay warm for
every job of the worker. Pipelines are found by name in
:mod:`dicomnode.pipelines.registry`.
"""

from dicomnode.pipelines.registry import PIPELINES, load_pipeline
from dicomnode.pipelines.types import (
    InstanceInput,
    Pipeline,
    PipelineOutcome,
    ResultObject,
    StudyInput,
)

__all__ = [
    "PIPELINES",
    "InstanceInput",
    "Pipeline",
    "PipelineOutcome",
    "ResultObject",
    "StudyInput",
    "load_pipeline",
]
