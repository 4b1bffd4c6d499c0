"""From a pipeline's typed result to the DICOM objects that go to the outbox.

The worker calls :func:`encode` after the pipeline: this is where the analysis meets
DICOM again (the source headers, the 8-bit image for the overlay), never inside the
pipeline's model steps.
"""

from __future__ import annotations

import io
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.config import OutputSettings
from dicomnode.imaging import to_hu, to_uint8
from dicomnode.inference.ct import window_uint8
from dicomnode.pipelines.base import PipelineOutcome, ResultObject, StudyInput
from dicomnode.results.sc import CT_SC_SERIES_NUMBER, build_heatmap_sc
from dicomnode.results.sr import build_ct_sr, build_sr
from dicomnode.results.uids import result_uid


def _encoded(ds: Dataset) -> ResultObject:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), buffer.getvalue())


def encode(
    outcome: PipelineOutcome, study: StudyInput, outputs: OutputSettings
) -> list[ResultObject]:
    """The result objects for ``outcome`` (its own, plus the encoders' for its analysis)."""
    objects = list(outcome.results)
    analysis: Any = outcome.analysis
    if analysis is None:
        return objects
    from dicomnode.pipelines.chest import ChestStudyResult
    from dicomnode.pipelines.ct import CTStudyResult
    from dicomnode.pipelines.cxr import CXRStudyResult

    parts = [analysis.cxr, analysis.ct] if isinstance(analysis, ChestStudyResult) else [analysis]
    for part in parts:
        if isinstance(part, CXRStudyResult) and part.images:
            objects += encode_cxr(part, study, outputs)
        elif isinstance(part, CTStudyResult) and part.evidence:
            objects += encode_ct(part, study, outputs)
    return objects


def encode_cxr(result: Any, study: StudyInput, outputs: OutputSettings) -> list[ResultObject]:
    """The TID 1500 SR and one Grad-CAM Secondary Capture per analysed radiograph."""
    paths = {i.sop_instance_uid: i.path for i in study.instances}
    headers = [
        dcmread(paths[image.sop_instance_uid], stop_before_pixels=True, force=True)
        for image in result.images
    ]
    institution = outputs.institution_name or None
    objects: list[ResultObject] = []
    if outputs.sr:
        sr = build_sr(
            result,
            headers,
            result.classes,
            software_version=__version__,
            manufacturer=outputs.manufacturer,
            institution_name=institution,
        )
        objects.append(_encoded(sr))
    if outputs.heatmap_sc:
        series_uid = result_uid(result.study_instance_uid, result.models, "sc-series")
        for number, (image, header) in enumerate(zip(result.images, headers, strict=True), 1):
            pixels = to_uint8(paths[image.sop_instance_uid]).pixels
            sc = build_heatmap_sc(
                image,
                header,
                pixels,
                image.probabilities[image.explained_class],
                series_uid=series_uid,
                sop_uid=result_uid(
                    result.study_instance_uid, result.models, f"sc:{image.sop_instance_uid}"
                ),
                instance_number=number,
                software_version=__version__,
                manufacturer=outputs.manufacturer,
                models=result.models,
                institution_name=institution,
                draw_boxes=outputs.draw_boxes,
            )
            objects.append(_encoded(sc))
    return objects


def encode_ct(result: Any, study: StudyInput, outputs: OutputSettings) -> list[ResultObject]:
    """The chest CT SR and one Grad-CAM Secondary Capture per evidence slice.

    The overlay's grey image is the slice in the classifier's window (the lung window by
    default), as the classifier saw it.
    """
    paths = {i.sop_instance_uid: i.path for i in study.instances}
    headers = [
        dcmread(paths[image.sop_instance_uid], stop_before_pixels=True, force=True)
        for image in result.evidence
    ]
    institution = outputs.institution_name or None
    objects: list[ResultObject] = []
    if outputs.sr:
        sr = build_ct_sr(
            result,
            headers,
            software_version=__version__,
            manufacturer=outputs.manufacturer,
            institution_name=institution,
        )
        objects.append(_encoded(sr))
    if outputs.heatmap_sc:
        series_uid = result_uid(result.study_instance_uid, result.models, "ct-sc-series")
        for number, (image, header) in enumerate(zip(result.evidence, headers, strict=True), 1):
            pixels = window_uint8(to_hu(paths[image.sop_instance_uid]), *result.window)
            sc = build_heatmap_sc(
                image,
                header,
                pixels,
                image.probability,
                series_uid=series_uid,
                sop_uid=result_uid(
                    result.study_instance_uid, result.models, f"sc:{image.sop_instance_uid}"
                ),
                instance_number=number,
                series_number=CT_SC_SERIES_NUMBER,
                software_version=__version__,
                manufacturer=outputs.manufacturer,
                models=result.models,
                institution_name=institution,
                draw_boxes=False,
            )
            objects.append(_encoded(sc))
    return objects
