"""Pipelines: what a worker runs for one study.

A pipeline receives a :class:`StudyInput` (file paths and index tags, no open
database, no network) and returns a :class:`PipelineOutcome`: the result objects
as encoded DICOM files plus a summary. Models are loaded once by :meth:`Pipeline.load`
and stay warm for every job of the worker.
"""

from dicomnode.pipelines.base import (
    InstanceInput,
    Pipeline,
    PipelineOutcome,
    ResultObject,
    StudyInput,
    load_pipeline,
)

__all__ = [
    "InstanceInput",
    "Pipeline",
    "PipelineOutcome",
    "ResultObject",
    "StudyInput",
    "load_pipeline",
]
