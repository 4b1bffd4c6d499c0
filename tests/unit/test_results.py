"""Result objects: the TID 1500 SR and the Grad-CAM Secondary Capture, from typed results.

The typed results are built by hand (no model runs) for two sources: a CR study of two
images generated here (non-square, so rows and columns cannot be swapped unnoticed) and,
when the project's shared data is there, a real 1024 x 1024 chest radiograph. Every
object is checked by dicom3tools' ``dciodvfy``, read back with pydicom and highdicom
(and dcmtk's ``dsrdump`` for the SR), and compared with the inputs; the overlay's
pixels are recomputed here in numpy with ``cv2.applyColorMap``.
"""

from __future__ import annotations

import re
import subprocess
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import dciodvfy

from dicomnode.imaging import to_uint8
from dicomnode.inference.geometry import Box
from dicomnode.inference.registry import CodedClass
from dicomnode.pipelines.types import CXRImageResult, CXRStudyResult, ModelUsed
from dicomnode.results import ResultError, box_polyline, build_heatmap_sc, build_sr, result_uid
from dicomnode.results.common import writable_character_set
from dicomnode.results.sc import caption, render_overlay, text_band_height

SHARED_CXR = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "dicom_cxr"
    / "chest"
    / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
)
DSRDUMP = Path("/usr/bin/dsrdump")

CLASSES = [
    CodedClass("bacterial", "53084003", "SCT", "Bacterial pneumonia"),
    CodedClass("covid19", "840539006", "SCT", "COVID-19"),
    CodedClass("normal", "17621005", "SCT", "Normal"),
]
MODELS = [
    ModelUsed("lung-unet", "1.2", "lung-mask", "1.2.826.0.1.3680043.10.999.1", "a" * 64),
    ModelUsed("vgg16", "0.1", "classifier", "1.2.826.0.1.3680043.10.999.2", "b" * 64),
    ModelUsed("vgg19", "0.4", "classifier", "1.2.826.0.1.3680043.10.999.3", "c" * 64),
    ModelUsed("detector", "2.0", "detector", "1.2.826.0.1.3680043.10.999.4", "d" * 64),
]
SOFTWARE = "0.1.0-test"


@dataclass
class Case:
    """One study's sources and the typed result built for them."""

    name: str
    sources: list[Dataset]
    paths: list[Path]
    result: CXRStudyResult


# --------------------------------------------------------------------------- inputs


def _heatmap() -> np.ndarray:
    """An 8 x 8 Grad-CAM with one hot block; zeros elsewhere."""
    heat = np.zeros((8, 8), np.float32)
    heat[2:5, 4:7] = 1.0
    heat[5, 1] = 0.5
    return heat


def _image(
    ds: Dataset,
    probabilities: tuple[float, float, float],
    lung: Box,
    boxes: list[Box],
    method: str,
) -> CXRImageResult:
    names = [c.name for c in CLASSES]
    p = dict(zip(names, probabilities, strict=True))
    members = {
        "vgg16": dict(zip(names, (0.5, 0.3, 0.2), strict=True)),
        "vgg19": dict(zip(names, (0.125, 0.625, 0.25), strict=True)),
    }
    return CXRImageResult(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        probabilities=p,
        member_probabilities=members,
        abnormal=bool(boxes),
        lung_box=lung,
        lung_found=True,
        boxes=boxes,
        box_method=method,
        explained_class="covid19",
        explained_by="vgg16",
        heatmap=_heatmap(),
    )


def _cr_dataset(study_uid: str, series_uid: str, number: int) -> Dataset:
    """A 12-bit CR image, 300 rows x 256 columns; no birth date, sex or accession number."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = "TEST-PID-0001"
    ds.StudyDate = "20260101"
    ds.Modality = "CR"
    ds.Manufacturer = "Test Modality Maker"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 300, 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rows, cols = np.mgrid[0:300, 0:256]
    pixels = (rows * 7 + cols * 5 + number * 300) % 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _generated_case(folder: Path) -> Case:
    study, series = generate_uid(), generate_uid()
    sources = [_cr_dataset(study, series, n) for n in (1, 2)]
    paths = []
    for ds in sources:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    images = [
        _image(
            sources[0],
            (0.25, 0.625, 0.125),
            Box(20, 40, 200, 240),
            [Box(50, 80, 40, 30, 0.875), Box(150.5, 200, 20.25, 15, 0.5)],
            "detector:detector",
        ),
        _image(
            sources[1],
            (0.0625, 0.875, 0.0625),
            Box(10, 30, 230, 260),
            [Box(120, 150, 60, 70, 0.75)],
            "gradcam-threshold",
        ),
    ]
    result = CXRStudyResult(study, images, [], list(MODELS), "weighted", {})
    return Case("generated-cr", sources, paths, result)


def _shared_case() -> Case:
    if not SHARED_CXR.exists():
        pytest.skip(
            f"{SHARED_CXR} is absent: this case needs the project's shared data beside "
            "the checkout (../shared/data)"
        )
    ds = pydicom.dcmread(SHARED_CXR)
    image = _image(
        ds,
        (0.1, 0.8, 0.1),
        Box(100, 120, 800, 780),
        [Box(200.5, 300, 100, 120, 0.8125), Box(600, 400, 50, 60, 0.625)],
        "detector:detector",
    )
    result = CXRStudyResult(str(ds.StudyInstanceUID), [image], [], list(MODELS), "mean", {})
    return Case("shared-cxr", [ds], [SHARED_CXR], result)


@pytest.fixture(scope="module", params=["generated-cr", "shared-cxr"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    if request.param == "generated-cr":
        return _generated_case(tmp_path_factory.mktemp("cr"))
    return _shared_case()


def _build_sr(case: Case, **changes: object) -> Dataset:
    result = replace(case.result, **changes)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the real file's one-part PatientName
        return build_sr(result, case.sources, CLASSES, software_version=SOFTWARE)


def _build_sc(case: Case, index: int) -> Dataset:
    image = case.result.images[index]
    models = case.result.models
    study = case.result.study_instance_uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_heatmap_sc(
            image,
            case.sources[index],
            to_uint8(case.paths[index]).pixels,
            image.probabilities[image.explained_class],
            series_uid=result_uid(study, models, "sc-series"),
            sop_uid=result_uid(study, models, f"sc:{image.sop_instance_uid}"),
            instance_number=index + 1,
            software_version=SOFTWARE,
            models=models,
        )


@pytest.fixture(scope="module")
def sr_file(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    _build_sr(case).save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def sc_files(case: Case, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sc")
    paths = []
    for index in range(len(case.result.images)):
        path = folder / f"sc{index}.dcm"
        _build_sc(case, index).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- helpers


def _read_report(path: Path) -> tuple[hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.srread(path)
    return sr, hd.sr.MeasurementReport.from_sequence(sr.content)


def _text_items(item: Dataset, code_value: str) -> list[str]:
    """The TEXT values with this concept name directly under a content item."""
    return [
        str(child.TextValue)
        for child in item.get("ContentSequence", [])
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _item_algorithm(item: Dataset) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) of a content item's TID 4019."""
    names, versions = _text_items(item, "111001"), _text_items(item, "111003")
    assert len(names) == 1 and len(versions) == 1, (names, versions)
    return names[0], versions[0]


def _algorithm(group: hd.sr.ContentSequence) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) of a measurement group's TID 4019."""
    return _item_algorithm(group[0])


def _probabilities(group: hd.sr.ContentSequence) -> dict[str, float]:
    by_code = {c.code_value: c.name for c in CLASSES}
    out = {}
    for measurement in group.get_measurements():
        assert measurement.unit.value == "1" and measurement.unit.scheme_designator == "UCUM"
        out[by_code[measurement.name.value]] = float(measurement.value)
    return out


def _tracking_uid(group: hd.sr.ContentSequence) -> str:
    return str(group.tracking_uid)


def _measurement_region(measurement: hd.sr.Measurement) -> tuple[np.ndarray, str]:
    """The (points, referenced SOP Instance UID) of a NUM's INFERRED FROM image region."""
    (region,) = measurement.referenced_coordinates
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    sop = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return region.value, sop


def _roi_source_uid(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> str:
    return str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


# --------------------------------------------------------------------------- UIDs


def test_result_uids_are_deterministic_and_follow_model_versions() -> None:
    study = "1.2.3.4"
    first = result_uid(study, MODELS, "sr")
    assert first == result_uid(study, list(reversed(MODELS)), "sr")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", first) and len(first) <= 64
    bumped = [replace(MODELS[1], version="0.2"), *MODELS[:1], *MODELS[2:]]
    others = {
        result_uid(study, bumped, "sr"),
        result_uid("1.2.3.5", MODELS, "sr"),
        result_uid(study, MODELS, "sr-series"),
        result_uid(study, MODELS, "sr", 1),
        result_uid(study, MODELS[:-1], "sr"),
    }
    assert first not in others and len(others) == 5
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        result_uid("", MODELS, "sr")


def test_sr_uids_repeat_for_the_same_inputs_and_change_with_a_model_version(case: Case) -> None:
    one, two = _build_sr(case), _build_sr(case)
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (
        two.SeriesInstanceUID,
        two.SOPInstanceUID,
    )
    bumped = [replace(m, version="9.9") if m.name == "vgg19" else m for m in MODELS]
    three = _build_sr(case, models=bumped)
    assert three.SeriesInstanceUID != one.SeriesInstanceUID
    assert three.SOPInstanceUID != one.SOPInstanceUID


# --------------------------------------------------------------------------- SR


def test_sr_passes_dciodvfy(sr_file: Path) -> None:
    errors, output = dciodvfy(sr_file)
    assert errors == [], output
    assert "Comprehensive3DSR" in output  # dciodvfy recognised the IOD


def test_sr_reads_with_dsrdump(sr_file: Path) -> None:
    if not DSRDUMP.exists():
        pytest.skip("dcmtk's dsrdump is not installed (apt-get install dcmtk)")
    run = subprocess.run([str(DSRDUMP), str(sr_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Verification Flag   : UNVERIFIED" in run.stdout
    assert '(112033,DCM,"Abnormal opacity")' in run.stdout


def test_sr_header_same_study_new_series_unverified(case: Case, sr_file: Path) -> None:
    ds = pydicom.dcmread(sr_file)
    source = case.sources[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in case.sources}
    assert ds.SeriesInstanceUID == result_uid(ds.StudyInstanceUID, MODELS, "sr-series")
    assert ds.SOPInstanceUID == result_uid(ds.StudyInstanceUID, MODELS, "sr")
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.Modality == "SR"
    assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
    procedure = [
        item.ConceptCodeSequence[0]
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert [(p.CodeValue, p.CodingSchemeDesignator) for p in procedure] == [("399208008", "SCT")]
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {s.SOPInstanceUID for s in case.sources}


def test_sr_every_group_tracks_an_image_region(case: Case, sr_file: Path) -> None:
    """Every finding is a planar ROI (TID 1410) on its source image; its measurements are
    TID 1501 groups right after it with the same Tracking Identifier and UID, each NUM
    inferred from the region. So a viewer that merges groups by Tracking UID (OHIF) finds
    a region for every group, and the lung region comes first."""
    _, report = _read_report(sr_file)
    regions = report.get_planar_roi_measurement_groups()
    measured = report.get_image_measurement_groups()
    region_by_uid = {_tracking_uid(g): g for g in regions}
    assert len(region_by_uid) == len(regions)
    for group in measured:
        region = region_by_uid[_tracking_uid(group)]
        assert group.tracking_identifier == region.tracking_identifier
        for measurement in group.get_measurements():
            points, sop = _measurement_region(measurement)
            np.testing.assert_allclose(points, region.roi.value, atol=1e-3)
            assert sop == _roi_source_uid(region)
    order = [
        (str(item.ContentSequence[0].TextValue), item.ContentTemplateSequence[0].TemplateIdentifier)
        for item in report[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"
        for item in item.ContentSequence
    ]
    expected = []
    for number, image in enumerate(case.result.images, start=1):
        expected.append((f"image {number}: lung region", "1410"))
        expected += [(f"image {number}: lung region", "1501")] * (
            1 + len(image.member_probabilities)
        )
        for i, box in enumerate(image.boxes, start=1):
            expected.append((f"image {number}: opacity {i}", "1410"))
            if box.confidence is not None:
                expected.append((f"image {number}: opacity {i}", "1501"))
    assert order == expected


def test_sr_probabilities_per_class_and_member(case: Case, sr_file: Path) -> None:
    _, report = _read_report(sr_file)
    for number, image in enumerate(case.result.images, start=1):
        regions = report.get_planar_roi_measurement_groups(
            referenced_sop_instance_uid=image.sop_instance_uid
        )
        (lung,) = [g for g in regions if g.tracking_identifier == f"image {number}: lung region"]
        groups = {
            _algorithm(g): g
            for g in report.get_image_measurement_groups(
                referenced_sop_instance_uid=image.sop_instance_uid
            )
            if _tracking_uid(g) == _tracking_uid(lung)
        }
        classification = groups.pop(("dicomnode CXR ensemble", SOFTWARE))
        assert _probabilities(classification) == pytest.approx(image.probabilities, abs=1e-12)
        assert [s.referenced_sop_instance_uid for s in classification.source_images] == [
            image.sop_instance_uid
        ]
        members = {}
        for member, probabilities in image.member_probabilities.items():
            version = next(m.version for m in MODELS if m.name == member)
            members[(member, version)] = probabilities
        assert set(groups) == set(members)
        for key, probabilities in members.items():
            assert _probabilities(groups[key]) == pytest.approx(probabilities, abs=1e-12)
        for group in (classification, *groups.values()):
            for measurement in group.get_measurements():
                points, sop = _measurement_region(measurement)
                np.testing.assert_allclose(points, box_polyline(image.lung_box), atol=1e-3)
                assert sop == image.sop_instance_uid


def test_sr_boxes_are_closed_polylines_on_their_source_image(case: Case, sr_file: Path) -> None:
    _, report = _read_report(sr_file)
    opacity = hd.sr.CodedConcept("112033", "DCM", "Abnormal opacity")
    for number, image in enumerate(case.result.images, start=1):
        groups = {
            g.tracking_identifier: g
            for g in report.get_planar_roi_measurement_groups(
                referenced_sop_instance_uid=image.sop_instance_uid
            )
        }
        expected_names = {f"image {number}: opacity {i}" for i in range(1, len(image.boxes) + 1)}
        assert expected_names | {f"image {number}: lung region"} == set(groups)
        for index, box in enumerate(image.boxes, start=1):
            group = groups[f"image {number}: opacity {index}"]
            assert group.finding_type == opacity
            assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            points = group.roi.value
            x, y = box.x, box.y
            corners = [[x, y], [x + box.width, y], [x + box.width, y + box.height]]
            corners += [[x, y + box.height], [x, y]]
            np.testing.assert_allclose(points, corners, atol=1e-3)
            assert points.shape == (5, 2) and (points[0] == points[-1]).all()
            assert _roi_source_uid(group) == image.sop_instance_uid
            assert (points[:, 0] >= 0).all() and (points[:, 0] <= image.columns).all()
            assert (points[:, 1] >= 0).all() and (points[:, 1] <= image.rows).all()
            assert group.get_measurements() == []  # the region only: its confidence follows
            (confidence,) = [
                g
                for g in report.get_image_measurement_groups()
                if _tracking_uid(g) == _tracking_uid(group)
            ]
            assert confidence.finding_type == opacity
            assert _algorithm(confidence) == _algorithm(group)
            (certainty,) = confidence.get_measurements()
            assert certainty.name.value == "111012"
            assert float(certainty.value) == pytest.approx(box.confidence, abs=1e-12)
            # The confidence is inferred from the box.
            certainty_points, certainty_sop = _measurement_region(certainty)
            np.testing.assert_allclose(certainty_points, corners, atol=1e-3)
            assert certainty_sop == image.sop_instance_uid
            if image.box_method == "gradcam-threshold":
                assert _algorithm(group) == ("Grad-CAM threshold", SOFTWARE)
            else:
                assert _algorithm(group) == ("detector", "2.0")
        lung = groups[f"image {number}: lung region"]
        assert lung.finding_type.value == "39607008"
        np.testing.assert_allclose(lung.roi.value, box_polyline(image.lung_box), atol=1e-3)
        assert _roi_source_uid(lung) == image.sop_instance_uid
        assert _algorithm(lung) == ("lung-unet", "1.2")


def test_sr_without_lungs_reports_the_whole_image_as_the_analysed_region(case: Case) -> None:
    image = case.result.images[0]
    whole = replace(image, lung_found=False, lung_box=Box(0, 0, image.columns, image.rows))
    sr = _build_sr(case, images=[whole, *case.result.images[1:]])
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    (region,) = [
        g
        for g in report.get_planar_roi_measurement_groups()
        if g.tracking_identifier == "image 1: lung region"
    ]
    assert region.finding_type.value != "39607008"  # not claimed to be the lung
    np.testing.assert_allclose(region.roi.value, box_polyline(whole.lung_box), atol=1e-3)
    (classification,) = [
        g
        for g in report.get_image_measurement_groups()
        if _tracking_uid(g) == _tracking_uid(region)
        and _algorithm(g) == ("dicomnode CXR ensemble", SOFTWARE)
    ]
    assert _probabilities(classification) == pytest.approx(image.probabilities, abs=1e-12)


def _qualitative(group: hd.sr.ContentSequence) -> dict[str, str]:
    """A group's qualitative evaluations: concept name code value -> value code value."""
    return {str(e.name.value): str(e.value.value) for e in group.get_qualitative_evaluations()}


def _texts(ds: Dataset) -> list[str]:
    """Every TEXT value of a content tree (the algorithm parameters among them)."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _ensemble_group(report: hd.sr.MeasurementReport, sop_uid: str) -> hd.sr.ContentSequence:
    (group,) = [
        g
        for g in report.get_image_measurement_groups(referenced_sop_instance_uid=sop_uid)
        if _algorithm(g) == ("dicomnode CXR ensemble", SOFTWARE)
    ]
    return group


def test_sr_states_each_finding_present_or_absent_at_its_operating_point(
    case: Case, tmp_path: Path
) -> None:
    points = {"covid19": 0.7, "bacterial": 0.2}
    images = [
        replace(i, findings={n: i.probabilities[n] >= p for n, p in points.items()})
        for i in case.result.images
    ]
    sr = _build_sr(case, images=images, operating_points=points)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy(path)
    assert errors == [], output
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    codes = {c.name: c.code_value for c in CLASSES}
    for image in images:
        group = _ensemble_group(report, image.sop_instance_uid)
        expected = {
            codes[n]: ("52101004" if image.probabilities[n] >= p else "2667000")
            for n, p in points.items()
        }
        assert _qualitative(group) == expected
        # The calibrated probability stays beside the decision.
        assert _probabilities(group) == pytest.approx(image.probabilities, abs=1e-12)
    text = _texts(sr)
    assert "operating point covid19: p >= 0.7000" in text
    assert "operating point bacterial: p >= 0.2000" in text


def test_sr_says_outside_the_validated_domain_instead_of_findings(
    case: Case, tmp_path: Path
) -> None:
    first, *rest = case.result.images
    outside = replace(first, boxes=[], findings={}, domain_score=3.5, domain_threshold=1.0)
    assert outside.outside_domain
    sr = _build_sr(case, images=[outside, *rest], operating_points={"covid19": 0.4})
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy(path)
    assert errors == [], output
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    group = _ensemble_group(report, outside.sop_instance_uid)
    assert _qualitative(group) == {"OOD-1": "52101004"}
    assert group.get_measurements() == []  # no probabilities presented as findings
    groups = report.get_image_measurement_groups(
        referenced_sop_instance_uid=outside.sop_instance_uid
    )
    assert len(groups) == 1  # nor the members' probabilities
    assert "out-of-domain score: 3.500 (outside above 1)" in _texts(sr)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99DICOMNODE"
    for image in rest:  # the other images keep their probabilities
        assert _probabilities(_ensemble_group(report, image.sop_instance_uid))


def test_sr_identifies_every_model_and_contributing_equipment(sr_file: Path) -> None:
    sr, report = _read_report(sr_file)
    identified = set()
    for group in [
        *report.get_image_measurement_groups(),
        *report.get_planar_roi_measurement_groups(),
    ]:
        identified.add(_algorithm(group))
    for model in MODELS:
        assert (model.name, model.version) in identified, model
    equipment = pydicom.dcmread(sr_file).ContributingEquipmentSequence
    processing = [
        item
        for item in equipment
        if (
            item.PurposeOfReferenceCodeSequence[0].CodeValue,
            item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
        )
        == ("109102", "DCM")
    ]
    by_model = {item.ManufacturerModelName: item for item in processing}
    for model in MODELS:
        item = by_model[model.name]
        assert item.SoftwareVersions == model.version
        assert item.DeviceUID == model.device_uid
        assert item.Manufacturer
    node = by_model["dicomnode"]
    assert node.SoftwareVersions == SOFTWARE and node.DeviceUID == sr.DeviceUID


def test_sr_refuses_inputs_it_cannot_encode(case: Case) -> None:
    long_meaning = [*CLASSES[:1], replace(CLASSES[1], code_meaning="x" * 65), *CLASSES[2:]]
    with pytest.raises(ResultError, match="65 characters"):
        build_sr(case.result, case.sources, long_meaning, software_version=SOFTWARE)
    with pytest.raises(ResultError, match="no coded concept"):
        build_sr(case.result, case.sources, CLASSES[:2], software_version=SOFTWARE)
    image = case.result.images[0]
    outside = replace(image, boxes=[Box(image.columns - 5, 10, 10, 10, 0.5)])
    with pytest.raises(ResultError, match="outside"):
        _build_sr(case, images=[outside])
    other = replace(case.result, study_instance_uid="1.2.3.999")
    with pytest.raises(ResultError, match="belongs to study"):
        build_sr(other, case.sources, CLASSES, software_version=SOFTWARE)
    with pytest.raises(ResultError, match="no source dataset"):
        build_sr(case.result, case.sources[1:] or [], CLASSES, software_version=SOFTWARE)
    with pytest.raises(ResultError, match="no analysed image"):
        _build_sr(case, images=[])


# --------------------------------------------------------------------------- character sets

#: (source's Specific Character Set, Patient's Name, the results' Specific Character Set)
CHARACTER_SETS = [
    ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
    # Japanese modalities: an empty first value (ISO 2022 IR 6) before the Kanji set.
    (
        "\\ISO 2022 IR 87",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ["ISO 2022 IR 6", "ISO 2022 IR 87"],
    ),
    # Korean: a defined term highdicom does not know, so UTF-8.
    ("\\ISO 2022 IR 149", "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
    ("ISO_IR100", "Müller^Jürgen", "ISO_IR 192"),  # a misspelling pydicom reads
    ("iso_ir 100", "Müller^Jürgen", "ISO_IR 192"),  # lower case: not even a valid CS
    ("ISO 2022 IR 100", "Müller^Jürgen", "ISO_IR 100"),  # one repertoire: no extensions
    ("ISO 2022 IR 6", "Smith^John", None),
    ("GB18030", "Wang^XiaoDong=王^小东", "GB18030"),
    ("ISO_IR 192", "Иванов^Пётр", "ISO_IR 192"),
]


@pytest.mark.parametrize(("declared", "name", "written"), CHARACTER_SETS)
def test_results_keep_the_patients_name_in_any_character_set(
    tmp_path: Path, declared: str, name: str, written: str | list[str] | None
) -> None:
    """Sources in the character sets real sites send get an SR and a Secondary Capture
    that dciodvfy accepts, declaring a character set highdicom writes, with the
    Patient's Name read back exactly as the source's."""
    case = _generated_case(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom on the misspelt term
        for ds, path in zip(case.sources, case.paths, strict=True):
            ds.SpecificCharacterSet = declared.split("\\") if "\\" in declared else declared
            ds.PatientName = name
            ds.save_as(path, enforce_file_format=True)
        sources = [pydicom.dcmread(path) for path in case.paths]  # as the node reads them
        assert str(sources[0].PatientName) == name
        case = replace(case, sources=sources)
        for kind, result in (("sr", _build_sr(case)), ("sc", _build_sc(case, 0))):
            path = tmp_path / f"{kind}.dcm"
            result.save_as(path, enforce_file_format=True)
            errors, output = dciodvfy(path)
            assert errors == [], output
            back = pydicom.dcmread(path)
            charset = back.get("SpecificCharacterSet")
            assert (charset if charset is None or isinstance(charset, str) else list(charset)) == (
                written
            ), kind
            assert str(back.PatientName) == name, kind


#: Values real modalities send that their VR (or the standard's terms) forbid.
INVALID_VALUES = [
    ("StudyDate", "2026-01-01"),
    ("PatientBirthDate", "19000000"),
    ("PatientSex", "Male"),
    ("StudyTime", "25:61:00"),
    ("PatientAge", "62"),
    ("AccessionNumber", "A" * 30),
    ("ReferringPhysicianName", "Dr. " + "x" * 70),
    ("InstitutionName", ["Hospital", "Department"]),
]


@pytest.mark.parametrize(("keyword", "value"), INVALID_VALUES)
def test_a_value_that_breaks_its_vr_is_left_empty_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keyword: str, value: object
) -> None:
    """highdicom refuses some of these outright (the study would get no result) and
    copies others into an invalid object: the SR and the SC come out valid, with the
    attribute empty, the source untouched, and a log line naming the keyword only."""
    case = _generated_case(tmp_path)
    for ds, path in zip(case.sources, case.paths, strict=True):
        setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    case = replace(case, sources=[pydicom.dcmread(path) for path in case.paths])
    original = case.sources[0][keyword].value
    with caplog.at_level("WARNING", logger="dicomnode.results"):
        results = {"sr": _build_sr(case), "sc": _build_sc(case, 0)}
    for kind, result in results.items():
        path = tmp_path / f"{kind}.dcm"
        result.save_as(path, enforce_file_format=True)
        errors, output = dciodvfy(path)
        assert errors == [], output
        back = pydicom.dcmread(path)
        assert back.get(keyword) in (None, ""), kind
        if keyword != "StudyDate":
            assert back.StudyDate == "20260101", kind  # valid values are kept
    assert case.sources[0][keyword].value == original  # the source is not changed
    uid = str(case.sources[0].SOPInstanceUID)
    logged = [
        r.getMessage().replace(uid, "") for r in caplog.records if r.name == "dicomnode.results"
    ]
    assert any(keyword in message for message in logged), caplog.text
    about_first = [r for r in caplog.records if uid in r.getMessage()]
    assert len(about_first) == 1, "one warning per source image, not one per result object"
    shown = value if isinstance(value, str) else value[0]
    assert not any(shown in message for message in logged), "a value was logged"


def test_writable_character_sets_are_the_ones_highdicom_takes() -> None:
    """The node's own check (which picks the UTF-8 fallback before highdicom would fail
    on the value) agrees with highdicom on every defined term and pair of them."""
    from highdicom import SpecificCharacterSetValues
    from highdicom.valuerep import _check_specific_character_set

    terms = [term.value for term in SpecificCharacterSetValues]
    combinations = [[t] for t in terms] + [[a, b] for a in terms for b in terms if a != b]
    for values in combinations:
        try:
            _check_specific_character_set(values if len(values) > 1 else values[0])
            takes = True
        except ValueError:
            takes = False
        assert writable_character_set(values) == takes, values


# --------------------------------------------------------------------------- SC


def test_sc_passes_dciodvfy(sc_files: list[Path]) -> None:
    for path in sc_files:
        errors, output = dciodvfy(path)
        assert errors == [], output
        assert "SCImage" in output


def test_sc_header_rgb_full_resolution_same_study(case: Case, sc_files: list[Path]) -> None:
    for source, path in zip(case.sources, sc_files, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        assert ds.pixel_array.shape == (source.Rows, source.Columns, 3)
        assert ds.BurnedInAnnotation == "YES"
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sc_pixels_are_the_seed_blend(case: Case, sc_files: list[Path]) -> None:
    for index, path in enumerate(sc_files):
        image = case.result.images[index]
        out = pydicom.dcmread(path).pixel_array.astype(np.int32)
        grey = to_uint8(case.paths[index]).pixels.astype(np.int32)
        heat = image.heatmap_in_source()
        rows, cols = grey.shape

        # Independent blend: JET (BGR) -> RGB, 0.4 * colour + grey, clipped.
        jet = cv2.applyColorMap((255 * heat).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        expected = np.clip(0.4 * jet + grey[..., None], 0, 255).astype(np.int32)

        band = text_band_height(cols, caption(image, image.probabilities["covid19"]))
        usable = np.zeros((rows, cols), bool)
        usable[band:] = True
        for box in image.boxes:  # leave out the drawn outlines
            y0, x0 = int(box.y) - 3, int(box.x) - 3
            y1, x1 = int(box.y + box.height) + 3, int(box.x + box.width) + 3
            usable[max(0, y0) : y1, max(0, x0) : x1] = False
        lung = np.zeros_like(usable)
        b = image.lung_box
        lung[round(b.y) : round(b.y + b.height), round(b.x) : round(b.x + b.width)] = True

        inside, outside = usable & lung, usable & ~lung
        assert inside.sum() > 1000 and outside.sum() > 1000
        assert np.abs(out[inside] - expected[inside]).max() <= 1
        assert (out[outside] == grey[outside][:, None]).all()  # no heat map there: plain grey
        hot = usable & (heat > 0.9)
        assert hot.sum() > 100
        coloured = np.abs(out[hot] - grey[hot][:, None]).max(axis=1) > 10
        assert coloured.mean() > 0.5  # visibly coloured where the heat is high
        cold = inside & (heat == 0)
        assert cold.sum() > 100
        assert (out[cold][:, :2] == grey[cold][:, None]).all()  # JET(0) is pure blue

        text = out[:band]
        yellow = (text[..., 0] > 200) & (text[..., 1] > 200) & (text[..., 2] < 80)
        assert yellow.sum() > 20, "no burned-in text"


def test_sc_text_scales_with_width_and_boxes_are_drawn(case: Case) -> None:
    image = case.result.images[0]
    line = caption(image, 0.87)
    assert line == "NOT FOR DIAGNOSTIC USE - Grad-CAM covid19 p=0.87"
    assert text_band_height(4096, line) > 3 * text_band_height(1024, line) * 0.9
    grey = np.full((image.rows, image.columns), 100, np.uint8)
    with_boxes = render_overlay(image, grey, 0.87)
    without = render_overlay(image, grey, 0.87, draw_boxes=False)
    box = image.boxes[0]
    edge = (round(box.y) + 2, round(box.x))  # on the left edge of the first box
    assert tuple(with_boxes[edge]) == (255, 0, 255)
    assert tuple(without[edge]) != (255, 0, 255)
    with pytest.raises(ResultError, match="shape"):
        render_overlay(image, grey[:-1], 0.87)
    with pytest.raises(ResultError, match="explained_probability"):
        render_overlay(image, grey, 1.5)
