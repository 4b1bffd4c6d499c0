"""The lung mask and the opacity map as a DICOM Segmentation (highdicom) on the source.

Two segments over the analysed radiograph, at its own Rows x Columns, FRACTIONAL
(PROBABILITY, 8 bits): 1 "Lung" (the lung U-Net's mask, values 0 or 1) and
2 "Opacity" (the detector's probability map, resized bilinearly to the source). A
viewer overlays them itself; nothing is burned in. Segment property codes: SCT
91723000 "Anatomical structure" / SCT 39607008 "Lung" for the lungs, SCT 49755003
"Morphologically abnormal structure" / SCT 128477000 "Abnormal tissue appearance"...
see :data:`OPACITY_TYPE`; both segments are AUTOMATIC with the producing model as the
algorithm. One instance per analysed image; UIDs from
:func:`~dicomnode.results.uids.result_uid` (kinds ``"seg-series"``, ``"seg:<SOP UID>"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationFractionalTypeValues,
    SegmentationTypeValues,
    SegmentDescription,
)
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

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

#: Series Number of the segmentation series.
SEG_SERIES_NUMBER = 9004
SEG_SERIES_DESCRIPTION = f"AI lung and opacity maps - {NOT_FOR_DIAGNOSIS}"
ANATOMY = CodedConcept("91723000", "SCT", "Anatomical structure")
LUNG = CodedConcept("39607008", "SCT", "Lung")
MORPHOLOGY = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
#: The detector's finding: SCT 128477000 "Abnormal tissue" (lung opacity).
OPACITY_TYPE = CodedConcept("128477000", "SCT", "Abnormal tissue")


def _algorithm(model: ModelDescription) -> AlgorithmIdentificationSequence:
    return AlgorithmIdentificationSequence(
        name=model.name,
        family=CodedConcept("123109", "DCM", "Artificial Intelligence"),
        version=model.version,
    )


def _at_source(values: np.ndarray, rows: int, columns: int, nearest: bool) -> np.ndarray:
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    out = cv2.resize(np.asarray(values, np.float32), (columns, rows), interpolation=mode)
    return np.clip(out, 0.0, 1.0)


def build_seg(
    source: Dataset,
    lung_mask: np.ndarray,
    opacity_map: np.ndarray | None,
    *,
    lung_model: ModelDescription,
    detector_model: ModelDescription | None,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    software_version: str = SOFTWARE_VERSION,
    manufacturer: str = MANUFACTURER,
    models: Sequence[ModelDescription] = (),
    institution_name: str | None = None,
) -> Segmentation:
    """The SEG of one radiograph: ``lung_mask`` (any resolution, boolean) and, when the
    detector ran, ``opacity_map`` (its probability map, any resolution)."""
    rows, columns = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if rows <= 0 or columns <= 0:
        raise ResultError(f"source {source.get('SOPInstanceUID')!r} has no Rows x Columns")
    if (opacity_map is None) != (detector_model is None):
        raise ResultError("an opacity map needs its detector model, and only then")
    header = copyable_header(source)
    planes = [_at_source(lung_mask.astype(np.float32), rows, columns, nearest=True)]
    descriptions = [
        SegmentDescription(
            segment_number=1,
            segment_label="Lung",
            segmented_property_category=ANATOMY,
            segmented_property_type=LUNG,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(lung_model),
        )
    ]
    if opacity_map is not None and detector_model is not None:
        planes.append(_at_source(opacity_map, rows, columns, nearest=False))
        descriptions.append(
            SegmentDescription(
                segment_number=2,
                segment_label="Opacity",
                segmented_property_category=MORPHOLOGY,
                segmented_property_type=OPACITY_TYPE,
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(detector_model),
            )
        )
    pixels = np.stack(planes, axis=-1)[None]  # (frames, rows, columns, segments)
    device_uid = node_device_uid(manufacturer, institution_name)
    seg = Segmentation(
        source_images=[header],
        pixel_array=pixels,
        segmentation_type=SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=software_version,
        device_serial_number=device_uid,
        fractional_type=SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        omit_empty_frames=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(
            models,
            manufacturer=manufacturer,
            software_version=software_version,
            device_uid=device_uid,
            institution_name=institution_name,
        ),
        series_description=SEG_SERIES_DESCRIPTION,
        institution_name=institution_name,
        specific_character_set=result_character_set(header),
    )
    # General Image Patient Orientation (Type 2C without a frame of reference): the
    # source's, else empty (never a made-up one).
    orientation = header.get("PatientOrientation")
    seg.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else None
    return seg
