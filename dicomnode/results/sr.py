"""The chest X-ray analysis of a study as a TID 1500 Measurement Report (Comprehensive 3D SR).

(:func:`build_ct_sr` makes the chest CT report with the same layout rules.)

One report per study, built with highdicom (valid once built), in the source study and
a new series. The document (PS3.16 TID 1500):

* Observation context: a device observer (TID 1004), the node.
* Procedure Reported: the imaging procedure, SCT 399208008 "Plain chest X-ray".
* Image Library: every analysed source image.
* Imaging Measurements, for each analysed image, in this order:

  1. the analysed region (the lung crop box; the whole image when the lung mask found no
     lungs): a TID 1410 planar ROI, finding SCT 39607008 "Lung" (SCT "Chest" for the
     whole image), TID 4019 the lung-mask model; no measurements of its own;
  2. its class probabilities: TID 1501 groups with the region's Tracking Identifier and
     Tracking Unique Identifier, the first for the ensemble (TID 4019 names the ensemble:
     the node's version; parameters: the strategy, every member with its version, the
     operating points and the out-of-domain score; when the models document operating
     points, one qualitative evaluation per such class, named by the class, SCT "Present"
     when its calibrated probability reaches its operating point, else SCT "Absent"),
     then one per ensemble member (the member model's name and version); each has one NUM
     per class of the manifests, named by the class's coded concept (``[[classes]]`` of the
     model manifests), value the probability, unit UCUM ``1``, INFERRED FROM the region
     (TID 300 "Image Region": the lung crop, or the whole image for a whole-image model).
     An image the out-of-domain gate flags gets instead one group with the qualitative
     evaluation "Outside the validated domain" (the node's private code, 99DICOMNODE,
     named in the Coding Scheme Identification Sequence) = SCT "Present": no
     probabilities are presented as findings and it has no boxes;
  3. each opacity box: a TID 1410 planar ROI, finding DCM 112033 "Abnormal opacity",
     finding site SCT 39607008 "Lung", TID 4019 the method that made it (the detector
     model, name and version, or ``Grad-CAM threshold`` with the explained class); then,
     when the box has a confidence, a TID 1501 group with the box's tracking identifiers,
     finding and method, and one NUM DCM 111012 "Certainty of Finding" (unit UCUM ``1``)
     INFERRED FROM the box.

  Every region and every measurement references its source image (TID 1501 "Source of
  Measurement", the regions' SELECTED FROM image). Boxes are closed POLYLINEs of 5 points,
  (column, row) in the source image's pixel coordinates of PS3.3 C.18.6.1.2 (the
  top-left corner of the top-left pixel is (0, 0)): a box (x, y, width, height) with
  its end exclusive has the corners (x, y), (x + width, y), (x + width, y + height),
  (x, y + height) and (x, y) again. Every ROI's Geometric Purpose is SCT 75958009
  "Bounded by": the rectangle bounds the finding.

  Why the geometry and the measurements are in separate groups: TID 1410 keeps a region's
  measurements (TID 1419) beside its SCOORD, while viewers built on the Cornerstone SR
  adapters (OHIF 3) read a group's geometry from under its first NUM, and a group with no
  coordinates at all breaks OHIF 3.13. Here every TID 1410 group has no NUM (it becomes a
  measurement in OHIF, a rectangle), and OHIF merges the TID 1501 groups into it by their
  shared Tracking Unique Identifier (their values become the measurement's labels).

Header: patient and study modules copied from the first source dataset (values that
break their VR are emptied, see :func:`~dicomnode.results.common.copyable_header`),
VerificationFlag UNVERIFIED, CompletionFlag COMPLETE, PreliminaryFlag PRELIMINARY,
Series and SOP Instance UIDs from :func:`~dicomnode.results.uids.result_uid` (kinds
``"sr-series"`` and ``"sr"``), Contributing Equipment per IHE AI Results (see
:func:`~dicomnode.results.common.contributing_equipment`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from dicomnode.inference.geometry import Box
from dicomnode.inference.registry import CodedClass
from dicomnode.results import codes
from dicomnode.results.common import (
    MANUFACTURER,
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    ModelDescription,
    ResultError,
    contributing_equipment,
    copyable_header,
    meaningful_spacing,
    node_device_uid,
    result_character_set,
)
from dicomnode.results.uids import result_uid

if TYPE_CHECKING:
    from dicomnode.pipelines.types import (
        CTSliceResult,
        CTStudyResult,
        CXRImageResult,
        CXRStudyResult,
    )

#: Algorithm Name (TID 4019) of the ensemble that combines the members' probabilities.
ENSEMBLE_ALGORITHM = "dicomnode CXR ensemble"
#: Algorithm Name (TID 4019) of the boxes made by thresholding the Grad-CAM heat map.
GRADCAM_THRESHOLD_ALGORITHM = "Grad-CAM threshold"
#: Series Number of the SR series unless the caller names another.
SR_SERIES_NUMBER = 9001
#: Series Description of the SR series.
SR_SERIES_DESCRIPTION = f"AI chest X-ray report - {NOT_FOR_DIAGNOSIS}"

_MODEL_TASKS_IN_ENSEMBLE = ("classifier", "stacking")


def box_polyline(box: Box) -> np.ndarray:
    """The closed 5-point ring (column, row) of a box's corners, first point repeated."""
    x0, y0 = float(box.x), float(box.y)
    x1, y1 = x0 + float(box.width), y0 + float(box.height)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def build_sr(
    result: CXRStudyResult,
    sources: Sequence[Dataset],
    classes: Sequence[CodedClass],
    *,
    software_version: str,
    manufacturer: str = MANUFACTURER,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    device_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``result`` (see the module documentation).

    ``sources`` are the source image datasets (pixel data not needed), at least one per
    analysed image, all of the result's study; the first one gives the patient and
    study modules. ``classes`` are the manifests' coded classes; every class name in the
    results needs one. ``device_uid`` is the node's Device UID (device observer and
    Contributing Equipment); without it a stable one is derived from the manufacturer
    and the institution. Raises :class:`~dicomnode.results.common.ResultError` when the
    inputs cannot make a valid report, quoting the bad value.
    """
    study_uid = result.study_instance_uid
    if not result.images:
        raise ResultError(f"study {study_uid}: no analysed image, nothing to report")
    if not sources:
        raise ResultError(f"study {study_uid}: no source dataset given")
    by_uid = _sources_by_uid(study_uid, sources)
    concepts = _class_concepts(classes)
    models = {m.name: m for m in result.models}
    device_uid = device_uid or node_device_uid(manufacturer, institution_name)

    groups: list[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    analysed: list[Dataset] = []
    for number, image in enumerate(result.images, start=1):
        source = by_uid.get(image.sop_instance_uid)
        if source is None:
            raise ResultError(
                f"study {study_uid}: no source dataset for analysed image "
                f"{image.sop_instance_uid!r}; given: {sorted(by_uid)}"
            )
        _check_geometry(image, source)
        analysed.append(source)
        groups += _image_groups(
            result, image, number, source, concepts, models, manufacturer, software_version
        )

    sr = _document(
        groups,
        procedure=codes.PLAIN_CHEST_XRAY,
        analysed=analysed,
        header_source=sources[0],
        models=result.models,
        study_uid=study_uid,
        kind="sr",
        series_description=SR_SERIES_DESCRIPTION,
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device_uid,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
    )
    if any(image.outside_domain for image in result.images):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = codes.PRIVATE_SCHEME
        scheme.CodingSchemeName = "dicomnode local codes"
        scheme.CodingSchemeResponsibleOrganization = manufacturer
        sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


# --------------------------------------------------------------------------- checks


def _document(
    groups: Sequence[Any],
    *,
    procedure: CodedConcept,
    analysed: Sequence[Dataset],
    header_source: Dataset,
    models: Sequence[ModelDescription],
    study_uid: str,
    kind: str,
    series_description: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    software_version: str,
    device_uid: str,
    institution_name: str | None,
    institutional_department_name: str | None,
) -> Comprehensive3DSR:
    """The Comprehensive 3D SR around a TID 1500 report of ``groups`` (CXR and CT alike).

    The node is the device observer; the Image Library lists ``analysed``; the patient and
    study modules come from ``header_source``; the series and instance UIDs are
    :func:`result_uid` of the study, the ``models`` and ``kind`` (``kind + "-series"`` for
    the series).
    """
    observer = ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=NODE_MODEL_NAME,
            manufacturer_name=manufacturer,
            model_name=NODE_MODEL_NAME,
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
        referenced_images=[_library_view(source) for source in analysed],
    )
    header = copyable_header(header_source)
    sr = Comprehensive3DSR(
        evidence=[header, *[s for s in analysed if s is not header_source]],
        content=report[0],
        series_instance_uid=result_uid(study_uid, models, f"{kind}-series"),
        series_number=series_number,
        sop_instance_uid=result_uid(study_uid, models, kind),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        contributing_equipment=contributing_equipment(
            models,
            manufacturer=manufacturer,
            software_version=software_version,
            device_uid=device_uid,
            institution_name=institution_name,
            institutional_department_name=institutional_department_name,
        ),
        series_description=series_description,
        manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=software_version,
        specific_character_set=result_character_set(header),
    )
    sr.DeviceUID = device_uid
    _library_modalities(sr, {str(s.SOPInstanceUID): s for s in analysed})
    return sr


def _library_view(source: Dataset) -> Dataset:
    """What highdicom's Image Library (TID 1600) reads of a source image.

    highdicom writes the projection radiography descriptors (TID 1603: patient
    orientation and imager pixel spacing) for CR, DX and other projection modalities
    and fails when the source lacks them, which many radiographs do. The view keeps
    the source's Modality only when both are there; otherwise it says ``OT`` so that
    the entry has the modality (from the SOP Class), Rows and Columns only.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(view, keyword, source[keyword].value)
    orientation = source.get("PatientOrientation")
    spacing = meaningful_spacing(source, "ImagerPixelSpacing")
    complete = (
        orientation is not None
        and len(orientation) == 2
        and all(orientation)
        and spacing is not None
    )
    view.Modality = source.get("Modality", "OT") if complete else "OT"
    if complete:
        view.PatientOrientation = orientation
        view.ImagerPixelSpacing = list(spacing)  # type: ignore[arg-type]
    return view


def source_modality(source: Dataset) -> Code | None:
    """The source's own Modality as its CID 29 code (``CR`` -> DCM CR "Computed
    Radiography"), or ``None`` when it has none or one CID 29 does not list."""
    value = str(source.get("Modality", "") or "").strip().upper()
    if not value:
        return None
    for name in dicom_codes.cid29.dir():
        code = getattr(dicom_codes.cid29, name)
        if code.value == value and code.scheme_designator == "DCM":
            return Code(code.value, code.scheme_designator, code.meaning)
    return None


def _library_modalities(sr: Dataset, sources: dict[str, Dataset]) -> None:
    """Set every Image Library entry's Modality (DCM 121139) to its source's own.

    highdicom codes an entry's modality from the SOP Class, so a radiograph stored as
    Secondary Capture (as RSNA ships them) or one whose projection descriptors are
    incomplete would be listed as ``OT``; the entry must say what the source says.
    """

    def walk(items: Sequence[Dataset], sop_uid: str | None) -> None:
        for item in items:
            uid = sop_uid
            if item.get("ValueType") == "IMAGE" and "ReferencedSOPSequence" in item:
                uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            name = item.get("ConceptNameCodeSequence")
            if (
                uid in sources
                and item.get("ValueType") == "CODE"
                and name
                and name[0].CodeValue == "121139"
            ):
                code = source_modality(sources[uid])
                if code is not None:
                    concept = item.ConceptCodeSequence[0]
                    concept.CodeValue = code.value
                    concept.CodingSchemeDesignator = code.scheme_designator
                    concept.CodeMeaning = code.meaning
            if "ContentSequence" in item:
                walk(item.ContentSequence, uid)

    walk(sr.get("ContentSequence", []), None)


def _sources_by_uid(study_uid: str, sources: Sequence[Dataset]) -> dict[str, Dataset]:
    by_uid: dict[str, Dataset] = {}
    for source in sources:
        sop_uid = str(source.get("SOPInstanceUID", ""))
        if not sop_uid:
            raise ResultError(f"study {study_uid}: a source dataset has no SOPInstanceUID")
        source_study = str(source.get("StudyInstanceUID", ""))
        if source_study != study_uid:
            raise ResultError(
                f"source {sop_uid} belongs to study {source_study!r}, not to the "
                f"result's study {study_uid!r}"
            )
        by_uid[sop_uid] = source
    return by_uid


def _class_concepts(classes: Sequence[CodedClass]) -> dict[str, CodedConcept]:
    concepts = {}
    for cls in classes:
        if len(cls.code_meaning) > 64:
            raise ResultError(
                f"class {cls.name!r}: code_meaning {cls.code_meaning!r} has "
                f"{len(cls.code_meaning)} characters, DICOM Code Meaning (LO) allows 64; "
                "shorten it in the model manifest"
            )
        try:
            concepts[cls.name] = CodedConcept(cls.code_value, cls.coding_scheme, cls.code_meaning)
        except (TypeError, ValueError) as exc:
            raise ResultError(f"class {cls.name!r}: not a valid coded concept ({exc})") from None
    return concepts


def _check_geometry(image: CXRImageResult, source: Dataset) -> None:
    rows, columns = source.get("Rows"), source.get("Columns")
    if (rows, columns) != (image.rows, image.columns):
        raise ResultError(
            f"image {image.sop_instance_uid}: the result is for {image.rows} x {image.columns} "
            f"pixels but the source has Rows x Columns {rows} x {columns}"
        )
    for box in (image.lung_box, *image.boxes):
        if box.width <= 0 or box.height <= 0 or not box.within(image.columns, image.rows):
            raise ResultError(
                f"image {image.sop_instance_uid}: box {box} is empty or outside the "
                f"{image.columns} x {image.rows} image"
            )
    for name, value in image.probabilities.items():
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ResultError(
                f"image {image.sop_instance_uid}: probability of {name!r} is {value!r}, "
                "not in [0, 1]"
            )


def _model(
    models: Mapping[str, ModelDescription], name: str, image: CXRImageResult
) -> ModelDescription:
    try:
        return models[name]
    except KeyError:
        raise ResultError(
            f"image {image.sop_instance_uid}: model {name!r} is not among the models used "
            f"{sorted(models)}"
        ) from None


# --------------------------------------------------------------------------- content


def _algorithm(model: ModelDescription) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=model.name, version=model.version)


def _tracking(
    study_uid: str, models: Sequence[ModelDescription], kind: str, label: str
) -> TrackingIdentifier:
    return TrackingIdentifier(
        uid=result_uid(study_uid, models, f"tracking:{kind}"), identifier=label
    )


def _coordinates(box: Box, region_source: SourceImageForRegion) -> CoordinatesForMeasurement:
    """The box as a measurement's INFERRED FROM SCOORD (TID 300 "Image Region")."""
    return CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=box_polyline(box),
        source_image=region_source,
        purpose=codes.IMAGE_REGION,
    )


def _probabilities(
    probabilities: dict[str, float],
    concepts: dict[str, CodedConcept],
    image: CXRImageResult,
    region: CoordinatesForMeasurement,
) -> list[Measurement]:
    missing = sorted(set(probabilities) - set(concepts))
    if missing:
        raise ResultError(
            f"image {image.sop_instance_uid}: classes {missing} have no coded concept; "
            f"coded classes: {sorted(concepts)}"
        )
    return [
        Measurement(
            name=concepts[name],
            value=float(probabilities[name]),
            unit=codes.UNITLESS,
            referenced_coordinates=[region],
        )
        for name in concepts
        if name in probabilities
    ]


def _image_groups(
    result: CXRStudyResult,
    image: CXRImageResult,
    number: int,
    source: Dataset,
    concepts: dict[str, CodedConcept],
    models: Mapping[str, ModelDescription],
    manufacturer: str,
    software_version: str,
) -> list[MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations]:
    """The image's groups: each region (TID 1410, geometry only) followed by the TID 1501
    groups of its measurements, which share its tracking identifiers."""
    study_uid, sop_uid, used = result.study_instance_uid, image.sop_instance_uid, result.models
    source_image = SourceImageForMeasurementGroup.from_source_image(source)
    region_source = SourceImageForRegion.from_source_image(source)
    groups: list[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []

    # The analysed region: the lung crop, or the whole image when no lung was found.
    region_finding = codes.LUNG if image.lung_found else codes.CHEST
    lung_tracking = _tracking(study_uid, used, f"{sop_uid}:lung", f"image {number}: lung region")
    lung_models = [m for m in used if m.task == "lung-mask"]
    groups.append(
        PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=lung_tracking,
            referenced_region=ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(image.lung_box),
                source_image=region_source,
            ),
            finding_type=region_finding,
            finding_category=codes.ANATOMICAL_STRUCTURE,
            algorithm_id=_algorithm(lung_models[0]) if lung_models else None,
            geometric_purpose=codes.BOUNDED_BY,
        )
    )
    # The region the classifiers saw: the lung crop, or the whole image for a whole-image model.
    analysed = _coordinates(image.heatmap_box, region_source)
    ensemble_members = [m for m in used if m.task in _MODEL_TASKS_IN_ENSEMBLE]
    points = result.operating_points
    ensemble = AlgorithmIdentification(
        name=ENSEMBLE_ALGORITHM,
        version=software_version,
        manufacturer=manufacturer,
        parameters=[
            f"strategy: {result.strategy}",
            *(f"{m.task}: {m.name} {m.version}" for m in ensemble_members),
            *(f"operating point {name}: p >= {points[name]:.4f}" for name in sorted(points)),
            *(
                [
                    f"out-of-domain score: {image.domain_score:.3f} (outside above "
                    f"{image.domain_threshold:g})"
                ]
                if image.domain_score is not None and image.domain_threshold is not None
                else []
            ),
        ],
    )
    if image.outside_domain:
        # Unlike the images the model was validated on: no probabilities presented as
        # findings, one coded Finding "Outside the validated domain" instead.
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=lung_tracking,
                finding_type=region_finding,
                algorithm_id=ensemble,
                qualitative_evaluations=[
                    QualitativeEvaluation(name=codes.OUTSIDE_VALIDATED_DOMAIN, value=codes.PRESENT)
                ],
                source_images=[source_image],
            )
        )
        return groups
    # The class probabilities of that region: the ensemble's (with each finding Present or
    # Absent at its operating point), then every member's.
    missing = sorted(set(image.findings) - set(concepts))
    if missing:
        raise ResultError(
            f"image {sop_uid}: findings {missing} have no coded concept; "
            f"coded classes: {sorted(concepts)}"
        )
    findings = [
        QualitativeEvaluation(name=concepts[name], value=codes.PRESENT if present else codes.ABSENT)
        for name, present in image.findings.items()
    ]
    probability_sets = [(ensemble, image.probabilities, findings)]
    for member, probabilities in image.member_probabilities.items():
        algorithm = _algorithm(_model(models, member, image))
        probability_sets.append((algorithm, probabilities, []))
    for algorithm, probabilities, evaluations in probability_sets:
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=lung_tracking,
                finding_type=region_finding,
                algorithm_id=algorithm,
                measurements=_probabilities(probabilities, concepts, image, analysed),
                qualitative_evaluations=evaluations or None,
                source_images=[source_image],
            )
        )

    if image.boxes:
        method = _box_method(image, models, manufacturer, software_version)
        for index, box in enumerate(image.boxes, start=1):
            tracking = _tracking(
                study_uid, used, f"{sop_uid}:opacity:{index}", f"image {number}: opacity {index}"
            )
            groups.append(
                PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=ImageRegion(
                        graphic_type=GraphicTypeValues.POLYLINE,
                        graphic_data=box_polyline(box),
                        source_image=region_source,
                    ),
                    finding_type=codes.ABNORMAL_OPACITY,
                    finding_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                    finding_sites=[FindingSite(anatomic_location=codes.LUNG)],
                    algorithm_id=method,
                    geometric_purpose=codes.BOUNDED_BY,
                )
            )
            if box.confidence is not None:
                groups.append(
                    MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=tracking,
                        finding_type=codes.ABNORMAL_OPACITY,
                        algorithm_id=method,
                        finding_sites=[FindingSite(anatomic_location=codes.LUNG)],
                        measurements=[
                            Measurement(
                                name=codes.CERTAINTY_OF_FINDING,
                                value=float(box.confidence),
                                unit=codes.UNITLESS,
                                referenced_coordinates=[_coordinates(box, region_source)],
                            )
                        ],
                        source_images=[source_image],
                    )
                )
    return groups


def _box_method(
    image: CXRImageResult,
    models: Mapping[str, ModelDescription],
    manufacturer: str,
    software_version: str,
) -> AlgorithmIdentification:
    """TID 4019 of the method that made the image's boxes (from ``box_method``)."""
    if image.box_method.startswith("detector:"):
        return _algorithm(_model(models, image.box_method.removeprefix("detector:"), image))
    if image.box_method == "gradcam-threshold":
        return AlgorithmIdentification(
            name=GRADCAM_THRESHOLD_ALGORITHM,
            version=software_version,
            manufacturer=manufacturer,
            parameters=[f"explained class: {image.explained_class}"],
        )
    raise ResultError(
        f"image {image.sop_instance_uid}: {len(image.boxes)} boxes but box_method is "
        f"{image.box_method!r}; expected 'detector:<model>' or 'gradcam-threshold'"
    )


# --------------------------------------------------------------------------- chest CT

#: Series Number of the CT report series (the CXR report has 9001).
CT_SR_SERIES_NUMBER = 9011
#: Series Description of the CT report series.
CT_SR_SERIES_DESCRIPTION = f"AI chest CT report - {NOT_FOR_DIAGNOSIS}"
#: Algorithm Name (TID 4019) of the classical lung mask.
HU_LUNG_MASK_ALGORITHM = "HU threshold lung mask"


def _check_ct_slice(image: CTSliceResult, source: Dataset) -> None:
    rows, columns = source.get("Rows"), source.get("Columns")
    if (rows, columns) != (image.rows, image.columns):
        raise ResultError(
            f"slice {image.sop_instance_uid}: the result is for {image.rows} x {image.columns} "
            f"pixels but the source has Rows x Columns {rows} x {columns}"
        )
    box = image.lung_box
    if box.width <= 0 or box.height <= 0 or not box.within(image.columns, image.rows):
        raise ResultError(
            f"slice {image.sop_instance_uid}: lung box {box} is empty or outside the "
            f"{image.columns} x {image.rows} image"
        )
    if not math.isfinite(image.probability) or not 0.0 <= image.probability <= 1.0:
        raise ResultError(
            f"slice {image.sop_instance_uid}: probability {image.probability!r} is not in [0, 1]"
        )


def build_ct_sr(
    result: CTStudyResult,
    sources: Sequence[Dataset],
    *,
    software_version: str,
    manufacturer: str = MANUFACTURER,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    device_uid: str | None = None,
    series_number: int = CT_SR_SERIES_NUMBER,
    instance_number: int = 1,
) -> Comprehensive3DSR:
    """The TID 1500 Measurement Report of a chest CT analysis.

    Same header, observer, identity and UID rules as :func:`build_sr` (kinds
    ``"ct-sr-series"`` and ``"ct-sr"``). The document:

    * Procedure Reported: SCT 169069000 "Computed tomography of chest".
    * Image Library: the evidence slices (the most probable ones).
    * Imaging Measurements:

      1. the study-level finding, a TID 1501 group: finding type the classifier's class
         (e.g. SCT 840539006 "COVID-19"); TID 4019 the classifier (name, version;
         parameters: the aggregation, the decision threshold, the series and the number
         of slices classified); one NUM named by the class, value the study score
         (probability, UCUM ``1``), INFERRED FROM the most probable slice's lung region,
         every evidence slice a Source of Measurement of the group;
         one qualitative evaluation named by the class, SCT "Present" when the score
         reaches the threshold, else SCT "Absent";
      2. for each evidence slice, highest probability first: its lung region (the lung
         box, TID 1410, finding SCT "Lung", TID 4019 the lung mask method) and a TID 1501
         group sharing its tracking identifiers with one NUM, the slice's probability of
         the class, INFERRED FROM that region.

    ``sources`` are the evidence slices' datasets (pixel data not needed).
    """
    study_uid = result.study_instance_uid
    if result.score is None or not result.evidence:
        raise ResultError(f"study {study_uid}: no classified CT slice, nothing to report")
    if not sources:
        raise ResultError(f"study {study_uid}: no source dataset given")
    by_uid = _sources_by_uid(study_uid, sources)
    [concept] = _class_concepts([result.finding]).values()
    used = result.models
    models = {m.name: m for m in used}
    device_uid = device_uid or node_device_uid(manufacturer, institution_name)
    classifier = next((m for m in used if m.task == "ct-classifier"), None)
    if classifier is None:
        raise ResultError(f"study {study_uid}: no ct-classifier among the models {sorted(models)}")
    if result.lung_mask_method.startswith("model:"):
        lung_algorithm = _algorithm(models[result.lung_mask_method.removeprefix("model:")])
    else:
        lung_algorithm = AlgorithmIdentification(
            name=HU_LUNG_MASK_ALGORITHM,
            version=software_version,
            manufacturer=manufacturer,
            parameters=result.lung_mask_parameters or None,
        )

    slice_groups: list[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    analysed: list[Dataset] = []
    regions: list[CoordinatesForMeasurement] = []
    classifier_id = _algorithm(classifier)
    for number, image in enumerate(result.evidence, start=1):
        source = by_uid.get(image.sop_instance_uid)
        if source is None:
            raise ResultError(
                f"study {study_uid}: no source dataset for evidence slice "
                f"{image.sop_instance_uid!r}; given: {sorted(by_uid)}"
            )
        _check_ct_slice(image, source)
        analysed.append(source)
        region_source = SourceImageForRegion.from_source_image(source)
        region = _coordinates(image.lung_box, region_source)
        regions.append(region)
        tracking = _tracking(
            study_uid, used, f"ct:{image.sop_instance_uid}:lung", f"evidence slice {number}: lung"
        )
        slice_groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_region=ImageRegion(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=box_polyline(image.lung_box),
                    source_image=region_source,
                ),
                finding_type=codes.LUNG,
                finding_category=codes.ANATOMICAL_STRUCTURE,
                algorithm_id=lung_algorithm,
                geometric_purpose=codes.BOUNDED_BY,
            )
        )
        slice_groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=codes.LUNG,
                algorithm_id=classifier_id,
                measurements=[
                    Measurement(
                        name=concept,
                        value=float(image.probability),
                        unit=codes.UNITLESS,
                        referenced_coordinates=[region],
                    )
                ],
                source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
            )
        )
    series = result.series_instance_uid or ""
    study_group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(
            study_uid, used, "ct:study", f"study: {result.finding.code_meaning}"
        ),
        finding_type=concept,
        algorithm_id=AlgorithmIdentification(
            name=classifier.name,
            version=classifier.version,
            parameters=[
                f"aggregation: {result.aggregation}"
                + "".join(f", {k} {v}" for k, v in result.aggregation_parameters.items()),
                f"threshold: {result.threshold}",
                f"slices classified: {len(result.slice_probabilities)}",
                f"series: {series}",
            ],
        ),
        measurements=[
            Measurement(
                name=concept,
                value=float(result.score),
                unit=codes.UNITLESS,
                # One SCOORD (the most probable slice's lung region): viewers built on the
                # Cornerstone SR adapters read one geometry per NUM. Every evidence slice is
                # a Source of Measurement of the group.
                referenced_coordinates=regions[:1],
            )
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=concept, value=codes.PRESENT if result.positive else codes.ABSENT
            )
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(s) for s in analysed],
    )
    return _document(
        [study_group, *slice_groups],
        procedure=codes.CT_OF_CHEST,
        analysed=analysed,
        header_source=analysed[0],
        models=used,
        study_uid=study_uid,
        kind="ct-sr",
        series_description=CT_SR_SERIES_DESCRIPTION,
        series_number=series_number,
        instance_number=instance_number,
        manufacturer=manufacturer,
        software_version=software_version,
        device_uid=device_uid,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
    )
