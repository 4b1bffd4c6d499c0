"""The Grad-CAM overlay of one radiograph as an RGB Secondary Capture image.

The picture is the seed's: the heat map (in [0, 1], placed in source pixels by
:meth:`~dicomnode.pipelines.cxr.CXRImageResult.heatmap_in_source`) is scaled to
``uint8(255 * heat)``, colour-mapped with OpenCV's JET map and blended as
``0.4 * colour + grey``, clipped to 0..255 and truncated to ``uint8``. The blend covers
the analysed region (``heatmap_box``: the lung crop, or the whole image for a
whole-image model), where the heat map exists; outside it the image stays the
plain grey image (JET's dark blue for "no heat" is not painted where there is no heat
map at all). The opacity boxes are drawn in magenta (a colour JET does not use), and a
black band at the top carries one burned-in line in yellow, e.g.
``NOT FOR DIAGNOSTIC USE - Grad-CAM covid19 p=0.87``, sized to the image width.

The image keeps the source's full resolution (Rows x Columns), so that it overlays the
source pixel for pixel. It is built with highdicom's ``SCImage.from_ref_dataset``: same
patient and study as the source, the caller's new series and SOP Instance UIDs
(:func:`~dicomnode.results.uids.result_uid` kinds ``"sc-series"`` and
``"sc:<SOPInstanceUID>"``), Burned In Annotation YES, a Source Image Sequence item
referencing the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np
from highdicom import PatientOrientationValuesBiped
from highdicom.sc import SCImage
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


class HeatmapImage(Protocol):
    """What the overlay reads of an analysed image: a radiograph
    (``dicomnode.pipelines.cxr.CXRImageResult``) or a CT slice
    (``dicomnode.pipelines.ct.CTSliceResult``)."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def rows(self) -> int: ...

    @property
    def columns(self) -> int: ...

    @property
    def heatmap_box(self) -> Box: ...

    @property
    def boxes(self) -> list[Box]: ...

    @property
    def explained_class(self) -> str: ...

    def heatmap_in_source(self) -> np.ndarray: ...


#: Series Number of the CT heat map series (the CXR one has 9002).
CT_SC_SERIES_NUMBER = 9012

#: The seed's blend weight of the colour-mapped heat map.
HEATMAP_WEIGHT = 0.4
#: Series Number of the heat map series unless the caller names another.
SC_SERIES_NUMBER = 9002
#: Series Description of the heat map series.
SC_SERIES_DESCRIPTION = f"AI Grad-CAM heat map - {NOT_FOR_DIAGNOSIS}"
#: Box outline colour (RGB): magenta does not occur in the JET colour map.
BOX_COLOUR = (255, 0, 255)
#: Text colour (RGB) on the black band.
TEXT_COLOUR = (255, 255, 0)
#: Share of the image width the text line takes.
TEXT_WIDTH_SHARE = 0.9

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def caption(image_result: HeatmapImage, explained_probability: float) -> str:
    """The burned-in line: the warning, the explained class and its probability."""
    return (
        f"{NOT_FOR_DIAGNOSIS} - Grad-CAM {image_result.explained_class} "
        f"p={explained_probability:.2f}"
    )


def text_band_height(columns: int, text: str) -> int:
    """Height in rows of the black band that carries ``text`` on an image this wide."""
    scale, thickness = _text_scale(columns, text)
    (_, height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    return height + baseline + 2 * _padding(columns)


def render_overlay(
    image_result: HeatmapImage,
    pixels8: np.ndarray,
    explained_probability: float,
    *,
    draw_boxes: bool = True,
) -> np.ndarray:
    """The overlay as an RGB ``uint8`` array of shape (Rows, Columns, 3).

    ``pixels8`` is the source's 8-bit grey image (``dicomnode.imaging.to_uint8``), of
    shape (Rows, Columns). See the module documentation for the recipe.
    """
    rows, columns = image_result.rows, image_result.columns
    if pixels8.dtype != np.uint8 or pixels8.shape != (rows, columns):
        raise ResultError(
            f"image {image_result.sop_instance_uid}: pixels8 must be uint8 of shape "
            f"({rows}, {columns}), got {pixels8.dtype} {pixels8.shape}"
        )
    if not 0.0 <= explained_probability <= 1.0:
        raise ResultError(
            f"image {image_result.sop_instance_uid}: explained_probability must be in "
            f"[0, 1], got {explained_probability!r}"
        )
    out = np.repeat(pixels8[..., None], 3, axis=2)
    box = image_result.heatmap_box
    x0, y0 = round(box.x), round(box.y)
    x1, y1 = round(box.x + box.width), round(box.y + box.height)
    heat = np.clip(image_result.heatmap_in_source()[y0:y1, x0:x1], 0.0, 1.0)
    colour_bgr = cv2.applyColorMap((255 * heat).astype(np.uint8), cv2.COLORMAP_JET)
    colour_rgb = colour_bgr[..., ::-1].astype(np.float32)
    blended = HEATMAP_WEIGHT * colour_rgb + out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(blended, 0, 255).astype(np.uint8)

    if draw_boxes:
        thickness = max(1, round(columns / 512))
        for b in image_result.boxes:
            top_left = (round(b.x), round(b.y))
            bottom_right = (round(b.x + b.width) - 1, round(b.y + b.height) - 1)
            cv2.rectangle(out, top_left, bottom_right, BOX_COLOUR, thickness)

    text = caption(image_result, explained_probability)
    scale, thickness = _text_scale(columns, text)
    (_, height), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = _padding(columns)
    band = min(rows, text_band_height(columns, text))
    out[:band] = 0
    cv2.putText(out, text, (pad, pad + height), _FONT, scale, TEXT_COLOUR, thickness, cv2.LINE_AA)
    return out


def build_heatmap_sc(
    image_result: HeatmapImage,
    source: Dataset,
    pixels8: np.ndarray,
    explained_probability: float,
    *,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    series_number: int = SC_SERIES_NUMBER,
    software_version: str = SOFTWARE_VERSION,
    manufacturer: str = MANUFACTURER,
    models: Sequence[ModelDescription] = (),
    device_uid: str | None = None,
    institution_name: str | None = None,
    draw_boxes: bool = True,
) -> SCImage:
    """The Grad-CAM overlay of ``image_result`` as an RGB Secondary Capture.

    ``source`` is the analysed image's dataset (pixel data not needed), ``pixels8`` its
    8-bit grey image, ``explained_probability`` the probability of the explained class.
    ``models`` (the study's models used) and ``device_uid`` (the node's) go into the
    Contributing Equipment Sequence as in the SR. Raises
    :class:`~dicomnode.results.common.ResultError`, quoting the bad value, when the
    inputs do not fit together.
    """
    if str(source.get("SOPInstanceUID", "")) != image_result.sop_instance_uid:
        raise ResultError(
            f"source {source.get('SOPInstanceUID')!r} is not the analysed image "
            f"{image_result.sop_instance_uid!r}"
        )
    if (source.get("Rows"), source.get("Columns")) != (image_result.rows, image_result.columns):
        raise ResultError(
            f"image {image_result.sop_instance_uid}: the result is for {image_result.rows} x "
            f"{image_result.columns} pixels but the source has Rows x Columns "
            f"{source.get('Rows')} x {source.get('Columns')}"
        )
    rgb = render_overlay(image_result, pixels8, explained_probability, draw_boxes=draw_boxes)
    source = copyable_header(source)  # what the SC copies: values valid for their VR
    orientation = _patient_orientation(source)
    device_uid = device_uid or node_device_uid(manufacturer, institution_name)
    spacing = source.get("PixelSpacing")
    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        # highdicom needs an orientation it knows for PATIENT; the source's is set below.
        patient_orientation=_biped(orientation) or ("L", "F"),
        # highdicom annotates ints; the spacing is in mm, a float.
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(
            models,
            manufacturer=manufacturer,
            software_version=software_version,
            device_uid=device_uid,
            institution_name=institution_name,
        ),
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=software_version,
        institution_name=institution_name,
        specific_character_set=result_character_set(source),
    )
    # The source's own orientation (e.g. "P\\FL", which highdicom's enum refuses), or
    # empty (Type 2) when the source has none: never a made-up one.
    sc.PatientOrientation = list(orientation) if orientation else None  # type: ignore[assignment]
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made on a workstation, not captured from a modality
    sc.DeviceUID = device_uid
    sc.ImageComments = caption(image_result, explained_probability)
    sc.DerivationDescription = (
        f"Grad-CAM heat map of {image_result.explained_class} over the lung crop, "
        f"JET colour map blended {HEATMAP_WEIGHT} over the grey image"
    )
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
        # General Series Laterality (Type 2C) depends on the body part: copy the
        # source's when it has one (even empty), never a guess.
        if "Laterality" in source:
            sc.Laterality = source.Laterality
    else:
        # No body part: whether it is paired is unknown, so Laterality is required and,
        # being unknown, empty (PS3.3 C.7.3.1) unless the source says.
        sc.Laterality = source.get("Laterality", "") or ""
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"  # derived from a lossy image (PS3.3 C.7.6.1.1.5)
        for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio"):
            if keyword in source:
                setattr(sc, keyword, source[keyword].value)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _padding(columns: int) -> int:
    return max(2, round(columns / 100))


def _text_scale(columns: int, text: str) -> tuple[float, int]:
    """Font scale and thickness that make ``text`` take about 90 % of the width."""
    (width, _), _ = cv2.getTextSize(text, _FONT, 1.0, 2)
    scale = TEXT_WIDTH_SHARE * (columns - 2 * _padding(columns)) / width
    return scale, max(1, round(2 * scale))


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it has two non-empty values."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2 or not all(value):
        return None
    return str(value[0]), str(value[1])


def _biped(orientation: tuple[str, str] | None) -> tuple[str, str] | None:
    """``orientation`` when both values are single directions highdicom's enum knows."""
    if orientation is None:
        return None
    try:
        return (
            PatientOrientationValuesBiped(orientation[0]).value,
            PatientOrientationValuesBiped(orientation[1]).value,
        )
    except ValueError:
        return None
