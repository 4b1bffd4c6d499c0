"""Results a viewer shows without burned-in pixels: the presentation state (GSPS) with
the opacity boxes and the Segmentation (lung mask, opacity map); and result objects that
carry the source's real attributes (Modality in the SR's Image Library, no zero pixel
spacing). Every object is checked by dciodvfy and read back."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from support import dciodvfy
from test_results import CLASSES, _generated_case  # the SR tests' CR study and result

from dicomnode.config import OutputSettings
from dicomnode.imaging import to_uint8
from dicomnode.pipelines.types import CXRStudyResult, SourceImage
from dicomnode.results.encode import encode_cxr
from dicomnode.results.sr import box_polyline
from dicomnode.results.uids import result_uid

GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _lungs() -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    mask[8:56, 6:28] = True
    mask[8:56, 36:58] = True
    return mask


def _opacity() -> np.ndarray:
    prob = np.zeros((32, 32), np.float32)
    prob[10:20, 5:12] = 0.9
    return prob


def _with_maps(result: CXRStudyResult, paths: list[Path]) -> CXRStudyResult:
    images = []
    for image, path in zip(result.images, paths, strict=True):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        images.append(
            replace(
                image,
                source=SourceImage(header, to_uint8(path).pixels),
                lung_mask=_lungs(),
                opacity_map=_opacity() if image.box_method.startswith("detector:") else None,
            )
        )
    return replace(result, images=images, classes=list(CLASSES))


def _encode(folder: Path, result: CXRStudyResult, **outputs: object) -> dict[str, list[Path]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        objects = encode_cxr(result, None, OutputSettings(**outputs))  # type: ignore[arg-type]
    by_class: dict[str, list[Path]] = {}
    for n, obj in enumerate(objects):
        path = folder / f"{n}.dcm"
        path.write_bytes(obj.data)
        by_class.setdefault(obj.sop_class_uid, []).append(path)
    return by_class


@pytest.fixture(scope="module")
def encoded(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CXRStudyResult, dict[str, list[Path]]]:
    case = _generated_case(tmp_path_factory.mktemp("src"))
    result = _with_maps(case.result, case.paths)
    return result, _encode(tmp_path_factory.mktemp("out"), result)


def test_gsps_and_seg_pass_dciodvfy(encoded: tuple[CXRStudyResult, dict[str, list[Path]]]) -> None:
    _, by_class = encoded
    assert len(by_class[GSPS_CLASS]) == 1 and len(by_class[SEG_CLASS]) == 2
    for path in by_class[GSPS_CLASS] + by_class[SEG_CLASS]:
        errors, output = dciodvfy(path)
        assert errors == [], output


def test_gsps_boxes_equal_the_srs_and_reference_the_source(
    encoded: tuple[CXRStudyResult, dict[str, list[Path]]],
) -> None:
    result, by_class = encoded
    gsps = pydicom.dcmread(by_class[GSPS_CLASS][0])
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in gsps.ReferencedSeriesSequence
        for item in series.ReferencedImageSequence
    }
    assert referenced == {i.sop_instance_uid for i in result.images}
    assert gsps.StudyInstanceUID == result.study_instance_uid
    # The SR's box polylines, per source image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sr = hd.sr.srread(by_class[SR_CLASS][0])
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    lung_rings = {
        i.sop_instance_uid: np.round(box_polyline(i.lung_box), 3).ravel().tolist()
        for i in result.images
    }
    sr_boxes: dict[str, list[list[float]]] = {}
    for group in report.get_planar_roi_measurement_groups():
        sop = str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        ring = np.round(group.roi.value, 3).ravel().tolist()
        if ring != lung_rings[sop]:  # the SR also holds each image's lung region
            sr_boxes.setdefault(sop, []).append(ring)
    gsps_boxes: dict[str, list[list[float]]] = {}
    labels: dict[str, list[str]] = {}
    for annotation in gsps.GraphicAnnotationSequence:
        sop = str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        assert annotation.GraphicLayer == "OPACITY"
        for graphic in annotation.GraphicObjectSequence:
            assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
            gsps_boxes.setdefault(sop, []).append(np.round(graphic.GraphicData, 3).tolist())
        labels[sop] = [str(t.UnformattedTextValue) for t in annotation.TextObjectSequence]
    assert {k: sorted(v) for k, v in gsps_boxes.items()} == {
        k: sorted(v) for k, v in sr_boxes.items()
    }
    first = result.images[0]
    assert (
        gsps_boxes[first.sop_instance_uid][0]
        == np.round(box_polyline(first.boxes[0]), 3).ravel().tolist()
    )
    assert labels[first.sop_instance_uid] == ["Opacity 0.88", "Opacity 0.50"]
    # No burned-in pixels: a presentation state has none
    assert "PixelData" not in gsps


def test_seg_holds_the_lung_mask_and_the_opacity_map(
    encoded: tuple[CXRStudyResult, dict[str, list[Path]]],
) -> None:
    result, by_class = encoded
    segs = {}
    for path in by_class[SEG_CLASS]:
        seg = hd.seg.segread(path)
        series = seg.ReferencedSeriesSequence[0]
        segs[str(series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)] = seg
    detected, fallback = result.images
    seg = segs[detected.sop_instance_uid]
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == ["Lung", "Opacity"]
    assert seg.SegmentationType == "FRACTIONAL" and (seg.Rows, seg.Columns) == (300, 256)
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns) / 255.0
    lung_plane, opacity_plane = pixels[0], pixels[1]
    assert set(np.unique(lung_plane)) <= {0.0, 1.0}
    assert lung_plane[150, 60] == 1.0 and lung_plane[150, 128] == 0.0  # left lung / midline
    # The opacity map (rows 10-20, cols 5-12 of 32 x 32) is high in its place at the source
    assert opacity_plane[int(15 * 300 / 32), int(8 * 256 / 32)] == pytest.approx(0.9, abs=0.01)
    assert opacity_plane[280, 240] == 0.0
    # Grad-CAM boxes, no detector map: the SEG has the lungs only
    assert [d.SegmentLabel for d in segs[fallback.sop_instance_uid].SegmentSequence] == ["Lung"]


def test_outputs_switch_gsps_and_seg_and_uids_are_deterministic(
    encoded: tuple[CXRStudyResult, dict[str, list[Path]]], tmp_path: Path
) -> None:
    result, by_class = encoded
    (tmp_path / "a").mkdir()
    again = _encode(tmp_path / "a", result)
    for cls in (GSPS_CLASS, SEG_CLASS):
        first = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in by_class[cls])
        second = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in again[cls])
        assert first == second
    gsps = pydicom.dcmread(by_class[GSPS_CLASS][0])
    assert gsps.SOPInstanceUID == result_uid(result.study_instance_uid, result.models, "gsps")
    (tmp_path / "b").mkdir()
    off = _encode(tmp_path / "b", result, gsps=False, seg=False)
    assert GSPS_CLASS not in off and SEG_CLASS not in off and SR_CLASS in off
    no_boxes = replace(
        result, images=[replace(i, boxes=[], box_method="none") for i in result.images]
    )
    (tmp_path / "c").mkdir()
    assert GSPS_CLASS not in _encode(tmp_path / "c", no_boxes)  # nothing to show


# ------------------------------------------------ the source's real attributes (issue 22)


def _library_modalities(path: Path) -> list[str]:
    sr = pydicom.dcmread(path)
    found: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "CODE" and name and name[0].CodeValue == "121139":
                found.append(str(item.ConceptCodeSequence[0].CodeValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.1", SC_CLASS])
def test_sr_library_gives_the_sources_modality(sop_class: str, tmp_path: Path) -> None:
    """A CR, as CR Image Storage without projection descriptors or as Secondary Capture
    (RSNA ships them so), is listed as CR, not OT."""
    case = _generated_case(tmp_path)
    for ds, path in zip(case.sources, case.paths, strict=True):
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        del ds.PatientOrientation
        ds.save_as(path, enforce_file_format=True)
    result = _with_maps(case.result, case.paths)
    result = replace(result, images=[replace(i, sop_class_uid=sop_class) for i in result.images])
    by_class = _encode(tmp_path, result, heatmap_sc=False, gsps=False, seg=False)
    assert _library_modalities(by_class[SR_CLASS][0]) == ["CR", "CR"]
    errors, output = dciodvfy(by_class[SR_CLASS][0])
    assert errors == [], output


def test_zero_pixel_spacing_is_left_out_of_the_results(tmp_path: Path) -> None:
    case = _generated_case(tmp_path)
    for ds, path in zip(case.sources, case.paths, strict=True):
        ds.PixelSpacing = ["0.000", "0.000"]
        ds.save_as(path, enforce_file_format=True)
    result = _with_maps(case.result, case.paths)
    out = tmp_path / "out"
    out.mkdir()
    by_class = _encode(out, result)
    assert set(by_class) == {SR_CLASS, SC_CLASS, GSPS_CLASS, SEG_CLASS}
    for paths in by_class.values():
        for path in paths:
            ds = pydicom.dcmread(path)
            assert "PixelSpacing" not in ds, path
            errors, output = dciodvfy(path)
            assert errors == [], output
