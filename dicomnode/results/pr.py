"""The opacity boxes as a Grayscale Softcopy Presentation State (GSPS) on the source.

A viewer shows the source radiograph with the boxes and their labels drawn by itself
(no burned-in pixels): one closed POLYLINE per box in the source's PIXEL coordinates
(the same corners as the SR's SCOORD), and one text object above each box,
``Opacity 0.83`` (the box's confidence), on the graphic layer ``OPACITY``. The state
references the analysed images (its Referenced Series Sequence) and shows them with
their own grey scale (no VOI change), copies patient and study from the source
(highdicom), and gets its UIDs from :func:`~dicomnode.results.uids.result_uid` (kinds
``"gsps"`` and ``"gsps-series"``): the same study and models give the same state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.inference.geometry import Box
from dicomnode.results.common import (
    MANUFACTURER,
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    SOFTWARE_VERSION,
    ModelDescription,
    ResultError,
    contributing_equipment,
    copyable_header,
    node_device_uid,
    result_character_set,
)
from dicomnode.results.sr import box_polyline

#: Series Number of the presentation state series.
GSPS_SERIES_NUMBER = 9003
#: Its Series Description (LO: 64 characters).
GSPS_SERIES_DESCRIPTION = f"AI opacity boxes - {NOT_FOR_DIAGNOSIS}"
#: Content Label (CS: upper case, 16 characters).
GSPS_CONTENT_LABEL = "AI_OPACITY"
#: The graphic layer of the boxes and their labels.
LAYER = "OPACITY"


class BoxedImage(Protocol):
    """What the state reads of an analysed radiograph (``CXRImageResult``)."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def rows(self) -> int: ...

    @property
    def columns(self) -> int: ...

    @property
    def boxes(self) -> list[Box]: ...


def box_label(box: Box) -> str:
    """The text shown with a box: ``Opacity`` and its confidence."""
    if box.confidence is None:
        return "Opacity"
    return f"Opacity {box.confidence:.2f}"


def build_gsps(
    images: Sequence[BoxedImage],
    sources: Sequence[Dataset],
    *,
    series_uid: str,
    sop_uid: str,
    software_version: str = SOFTWARE_VERSION,
    manufacturer: str = MANUFACTURER,
    models: Sequence[ModelDescription] = (),
    institution_name: str | None = None,
    box_method: str = "",
) -> GrayscaleSoftcopyPresentationState:
    """One presentation state over the study's analysed radiographs with their boxes.

    ``sources`` are the analysed images' headers in the order of ``images``. Images
    without a box are referenced (the state applies to them) but carry no annotation.
    Raises :class:`~dicomnode.results.common.ResultError` when they do not fit together.
    """
    if len(images) != len(sources) or not images:
        raise ResultError(f"{len(images)} analysed images but {len(sources)} source headers")
    headers = []
    for image, source in zip(images, sources, strict=True):
        if str(source.get("SOPInstanceUID", "")) != image.sop_instance_uid:
            raise ResultError(
                f"source {source.get('SOPInstanceUID')!r} is not the analysed image "
                f"{image.sop_instance_uid!r}"
            )
        for box in image.boxes:
            if not box.within(image.columns, image.rows):
                raise ResultError(
                    f"image {image.sop_instance_uid}: box {box} lies outside its "
                    f"{image.columns} x {image.rows} pixels"
                )
        headers.append(copyable_header(source))
    layer = GraphicLayer(layer_name=LAYER, order=1, description="AI opacity boxes")
    annotations = []
    for image, header in zip(images, headers, strict=True):
        if not image.boxes:
            continue
        graphics = [
            GraphicObject(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(box),
                units=AnnotationUnitsValues.PIXEL,
            )
            for box in image.boxes
        ]
        texts = [
            TextObject(
                text_value=box_label(box),
                units=AnnotationUnitsValues.PIXEL,
                anchor_point=(float(box.x), float(max(box.y - 2.0, 0.0))),
                anchor_point_visible=False,
            )
            for box in image.boxes
        ]
        annotations.append(
            GraphicAnnotation(
                referenced_images=[header],
                graphic_layer=layer,
                graphic_objects=graphics,
                text_objects=texts,
            )
        )
    device_uid = node_device_uid(manufacturer, institution_name)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=headers,
        series_instance_uid=series_uid,
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=software_version,
        device_serial_number=device_uid,
        content_label=GSPS_CONTENT_LABEL,
        content_description=f"Opacity boxes ({box_method})"[:64] if box_method else None,
        graphic_annotations=annotations or None,
        graphic_layers=[layer],
        institution_name=institution_name,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(
            models,
            manufacturer=manufacturer,
            software_version=software_version,
            device_uid=device_uid,
            institution_name=institution_name,
        ),
        specific_character_set=result_character_set(headers[0]),
    )
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    # General Series Laterality (Type 2C): the source's when it says, else empty (unknown).
    gsps.Laterality = headers[0].get("Laterality", "") or ""
    return gsps
