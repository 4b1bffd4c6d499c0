"""From a pipeline's typed result to the DICOM objects that go to the outbox.

The worker calls :func:`encode` after the pipeline: this is where the analysis meets
DICOM again, never inside the pipeline's model steps. The encoder is chosen by the
analysis' type (:data:`ENCODERS`); the source headers and the grey image for the
overlay come with the analysis (:class:`~dicomnode.pipelines.types.SourceImage`), so
no source file is read or decoded again here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset

from dicomnode import __version__
from dicomnode.config import OutputSettings
from dicomnode.errors import DicomNodeError
from dicomnode.pipelines.types import (
    ChestStudyResult,
    CTSliceResult,
    CTStudyResult,
    CXRImageResult,
    CXRStudyResult,
    PipelineOutcome,
    ResultObject,
    SourceImage,
    StudyInput,
)
from dicomnode.results.pr import build_gsps
from dicomnode.results.sc import CT_SC_SERIES_NUMBER, build_heatmap_sc
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_ct_sr, build_sr
from dicomnode.results.uids import result_uid


def _encoded(ds: Dataset) -> ResultObject:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), buffer.getvalue())


def _source(image: CXRImageResult | CTSliceResult) -> SourceImage:
    if image.source is None:
        raise DicomNodeError(
            f"the analysis of {image.sop_instance_uid} carries no source header and image "
            "(a pipeline must hand them forward to the encoders)"
        )
    return image.source


def encode(
    outcome: PipelineOutcome, study: StudyInput, outputs: OutputSettings
) -> list[ResultObject]:
    """The result objects for ``outcome``: its own, plus the encoder's for its analysis."""
    objects = list(outcome.results)
    analysis = outcome.analysis
    if analysis is None:
        return objects
    encoder = ENCODERS.get(type(analysis))
    if encoder is None:
        raise DicomNodeError(f"no result encoder for {type(analysis).__name__}")
    return objects + encoder(analysis, study, outputs)


def encode_cxr(
    result: CXRStudyResult, study: StudyInput, outputs: OutputSettings
) -> list[ResultObject]:
    """The TID 1500 SR, one Grad-CAM Secondary Capture per analysed radiograph, the
    presentation state with the boxes (when there are any) and one Segmentation per
    radiograph (lung mask and opacity map), as ``[outputs]`` says."""
    if not result.images:
        return []
    sources = [_source(image) for image in result.images]
    headers = [source.header for source in sources]
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
        for number, (image, source) in enumerate(zip(result.images, sources, strict=True), 1):
            if image.outside_domain:
                # No heat map presented as the evidence of a finding the report does not
                # make; the study's status note names the image's code.
                continue
            sc = build_heatmap_sc(
                image,
                source.header,
                source.display,
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
    if outputs.gsps and any(image.boxes for image in result.images):
        methods = sorted({image.box_method for image in result.images if image.boxes})
        gsps = build_gsps(
            result.images,
            headers,
            series_uid=result_uid(result.study_instance_uid, result.models, "gsps-series"),
            sop_uid=result_uid(result.study_instance_uid, result.models, "gsps"),
            software_version=__version__,
            manufacturer=outputs.manufacturer,
            models=result.models,
            institution_name=institution,
            box_method=", ".join(methods),
        )
        objects.append(_encoded(gsps))
    if outputs.seg:
        objects += _cxr_segs(result, headers, outputs)
    return objects


def _cxr_segs(
    result: CXRStudyResult, headers: list[Dataset], outputs: OutputSettings
) -> list[ResultObject]:
    """One Segmentation per radiograph that has a lung mask."""
    by_task = {m.task: m for m in result.models}
    lung_model = by_task.get("lung-mask")
    detector = by_task.get("detector")
    if lung_model is None:
        return []
    series_uid = result_uid(result.study_instance_uid, result.models, "seg-series")
    objects = []
    for number, (image, header) in enumerate(zip(result.images, headers, strict=True), 1):
        if image.lung_mask is None:
            continue
        seg = build_seg(
            header,
            image.lung_mask,
            image.opacity_map,
            lung_model=lung_model,
            detector_model=detector if image.opacity_map is not None else None,
            series_uid=series_uid,
            sop_uid=result_uid(
                result.study_instance_uid, result.models, f"seg:{image.sop_instance_uid}"
            ),
            instance_number=number,
            software_version=__version__,
            manufacturer=outputs.manufacturer,
            models=result.models,
            institution_name=outputs.institution_name or None,
        )
        objects.append(_encoded(seg))
    return objects


def encode_ct(
    result: CTStudyResult, study: StudyInput, outputs: OutputSettings
) -> list[ResultObject]:
    """The chest CT SR and one Grad-CAM Secondary Capture per evidence slice.

    The overlay's grey image is the slice in the classifier's window (the lung window by
    default), as the classifier saw it.
    """
    if not result.evidence:
        return []
    sources = [_source(image) for image in result.evidence]
    headers = [source.header for source in sources]
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
        for number, (image, source) in enumerate(zip(result.evidence, sources, strict=True), 1):
            sc = build_heatmap_sc(
                image,
                source.header,
                source.display,
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


def encode_chest(
    result: ChestStudyResult, study: StudyInput, outputs: OutputSettings
) -> list[ResultObject]:
    """The radiographs' objects and the CT's objects of a study analysed by both."""
    objects: list[ResultObject] = []
    if result.cxr is not None:
        objects += encode_cxr(result.cxr, study, outputs)
    if result.ct is not None:
        objects += encode_ct(result.ct, study, outputs)
    return objects


#: The encoder of each typed study result (keyed by the analysis' exact type).
ENCODERS: dict[type, Callable[[Any, StudyInput, OutputSettings], list[ResultObject]]] = {
    CXRStudyResult: encode_cxr,
    CTStudyResult: encode_ct,
    ChestStudyResult: encode_chest,
}
