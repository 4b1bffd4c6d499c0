"""Closing the loop: a study sent to the node comes back to Orthanc as an SR and an SC."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from support import (
    OrthancServer,
    dciodvfy,
    dcmtk,
    dicom_files,
    running_node,
    shared_data,
    storescu,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def test_sr_and_heatmap_arrive_in_the_same_study_in_orthanc(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from fixture_models import cxr_node_sections, write_cxr_models

    source = shared_data(
        "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    source_ds = dcmread(source)
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        models = write_cxr_models(tmp_path / "models")
        with running_node(
            tmp_path / "node",
            **cxr_node_sections(models, orthanc.port, abnormal_threshold=0.0),
        ) as node:
            assert node.cli("echo", "pacs").returncode == 0
            [run] = storescu([source], node.port)
            assert run.returncode == 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                deliveries = node.status()["deliveries"]
                if deliveries["delivered"] >= 3 and not deliveries["pending"]:
                    break
                time.sleep(0.5)
            status = node.status()
            # SR, SC, SEG, and the GSPS when the detector found boxes
            assert status["deliveries"]["delivered"] in (3, 4), status["undelivered"]
            [study] = node.studies().values()
            assert study["state"] == "done"
        # Orthanc holds the source, the SR and the SC, all in one study.
        studies = orthanc.get("/studies")
        assert len(studies) == 1
        instances = orthanc.get(f"/studies/{studies[0]}/instances")
        by_class: dict[str, list[str]] = {}
        for inst in instances:
            tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
            if tags["SOPInstanceUID"] == source_ds.SOPInstanceUID:
                continue  # the source itself (sent by the test: the node does not forward it)
            by_class.setdefault(tags["SOPClassUID"], []).append(inst["ID"])
        assert len(by_class[SR_CLASS]) == 1 and len(by_class[SC_CLASS]) == 1
        assert len(by_class[SEG_CLASS]) == 1 and len(by_class.get(GSPS_CLASS, [])) <= 1
        for extra in by_class[SEG_CLASS] + by_class.get(GSPS_CLASS, []):
            assert dciodvfy(orthanc.download(extra, tmp_path / f"{extra}.dcm"))[0] == []
        sr_path = orthanc.download(by_class[SR_CLASS][0], tmp_path / "sr.dcm")
        sc_path = orthanc.download(by_class[SC_CLASS][0], tmp_path / "sc.dcm")
        assert dciodvfy(sr_path)[0] == []
        assert dciodvfy(sc_path)[0] == []
        dump = subprocess.run([dcmtk("dsrdump"), str(sr_path)], capture_output=True, text=True)
        assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout
        sr = dcmread(sr_path)
        assert sr.StudyInstanceUID == source_ds.StudyInstanceUID
        assert sr.VerificationFlag == "UNVERIFIED"
        # Every SCOORD references the source image and lies inside it.
        scoords = []

        def walk(items):  # type: ignore[no-untyped-def]
            for item in items:
                if item.ValueType == "SCOORD":
                    scoords.append(item)
                walk(item.get("ContentSequence", []))

        walk(sr.ContentSequence)
        assert scoords, "no spatial coordinates in the SR"
        for item in scoords:
            ref = item.ContentSequence[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
            points = list(map(float, item.GraphicData))
            xs, ys = points[0::2], points[1::2]
            assert item.GraphicType == "POLYLINE" and points[:2] == points[-2:]
            assert min(xs) >= 0 and max(xs) <= source_ds.Columns
            assert min(ys) >= 0 and max(ys) <= source_ds.Rows
        # The probabilities in the SR are the pipeline's.
        summary = json.dumps(sr.to_json_dict())
        assert (
            "Algorithm Name"
            in subprocess.run(
                [dcmtk("dsrdump"), str(sr_path)], capture_output=True, text=True
            ).stdout
            or "111001" in summary
        )
        sc = dcmread(sc_path)
        assert sc.StudyInstanceUID == source_ds.StudyInstanceUID
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert (sc.Rows, sc.Columns) == (source_ds.Rows, source_ds.Columns)
    finally:
        orthanc.stop()


def _ensemble_probabilities(sr: Any) -> dict[str, float]:
    """The first NUM value per concept code in the SR (the ensemble group comes first)."""
    values: dict[str, float] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                code = item.ConceptNameCodeSequence[0].CodeValue
                values.setdefault(code, float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


def test_every_shared_chest_file_comes_back_with_its_findings(tmp_path: Path) -> None:
    """storescu sends each chest file; each analysed study returns one SR and one SC per
    analysed image, whose probabilities are the pipeline's; the lateral study is skipped."""
    pytest.importorskip("keras")
    from fixture_models import CLASSES, cxr_node_sections, write_cxr_models
    from sqlalchemy import select

    from dicomnode.config import load_settings
    from dicomnode.db import Database, Job, Study

    files = dicom_files(shared_data("dicom_cxr", "chest"))
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        models = write_cxr_models(tmp_path / "models")
        with running_node(
            tmp_path / "node",
            **cxr_node_sections(models, orthanc.port),
        ) as node:
            for run in storescu(files, node.port):
                assert run.returncode == 0, run.stdout + run.stderr
            studies = node.wait_for(
                lambda s: s and all(v["state"] in ("done", "skipped") for v in s.values()),
                240,
                "every study analysed or skipped",
            )
            deadline = time.monotonic() + 120
            while node.status()["deliveries"]["pending"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert node.status()["deliveries"]["pending"] == 0
            db = Database(load_settings(node.config).database.url)
            with db.read() as session:
                summaries = {
                    uid: json.loads(summary)
                    for uid, summary in session.execute(
                        select(Study.study_instance_uid, Job.summary).join(
                            Job, Job.study_id == Study.id
                        )
                    )
                }
        codes = {name: code for name, code, _ in CLASSES}
        skipped = [uid for uid, s in studies.items() if s["state"] == "skipped"]
        assert len(skipped) == 1 and "lateral-view" in studies[skipped[0]]["reason"]
        done = [uid for uid, s in studies.items() if s["state"] == "done"]
        assert len(done) == len(studies) - 1 >= 3
        for uid in done:
            [study_id] = [
                s["ID"]
                for s in orthanc.get("/studies?expand")
                if s["MainDicomTags"]["StudyInstanceUID"] == uid
            ]
            objects = orthanc.get(f"/studies/{study_id}/instances")
            tags = [orthanc.get(f"/instances/{o['ID']}/simplified-tags") for o in objects]
            srs = [t for t, o in zip(tags, objects, strict=True) if t["SOPClassUID"] == SR_CLASS]
            scs = [t for t in tags if t["SOPClassUID"] == SC_CLASS]
            segs = [t for t in tags if t["SOPClassUID"] == SEG_CLASS]
            images = summaries[uid]["images"]
            assert len(srs) == 1 and len(scs) == len(images) == len(segs)
            for o, t in zip(objects, tags, strict=True):  # every object the node produced
                path = orthanc.download(o["ID"], tmp_path / f"{t['SOPInstanceUID']}.dcm")
                assert dciodvfy(path)[0] == [], t["SOPClassUID"]
            sr_id = next(o["ID"] for o, t in zip(objects, tags, strict=True) if t in srs)
            sr = dcmread(orthanc.download(sr_id, tmp_path / f"{uid}.dcm"))
            got = _ensemble_probabilities(sr)
            for name, p in images[0]["probabilities"].items():
                assert got[codes[name]] == pytest.approx(p, abs=1e-4), (uid, name)
    finally:
        orthanc.stop()


REPO = Path(__file__).resolve().parents[2]
NIH_BOXES = REPO.parent / "shared" / "data" / "cxr_opacity_boxes" / "nih_cxr14_bbox"
#: A held-out (test split) NIH radiograph with a radiologist's Pneumonia box.
NIH_PNEUMONIA = "00005567_000"


def _cr_from_png(png: Path, folder: Path) -> Path:
    """The NIH PNG as a CR Image Storage instance, as a CR reader might send it: a
    Pixel Spacing of 0.000\\0.000 (valid in form, meaningless) beside the real Imager
    Pixel Spacing, no Patient Orientation."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "NIH^" + png.stem
    ds.PatientID = png.stem.split("_")[0]
    ds.StudyDate = "20260101"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PixelSpacing = ["0.000", "0.000"]
    ds.ImagerPixelSpacing = ["0.143", "0.143"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"{png.stem}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.skipif(
    not (NIH_BOXES.is_dir() and (REPO / "models" / "cxr-opacity-detector").is_dir()),
    reason="needs ../shared/data (the NIH box set) and the shipped detector",
)
def test_a_radiograph_with_a_pneumonia_box_comes_back_with_sr_gsps_and_seg(
    tmp_path: Path,
) -> None:
    """The shipped models (config.toml's [cxr]) on a held-out NIH radiograph with a
    radiologist's Pneumonia box: Orthanc gets the SR, the SC, a GSPS whose boxes are the
    SR's and which references the source, and a SEG; all dciodvfy clean; the SR lists the
    source as CR and no object carries the source's zero Pixel Spacing."""
    pytest.importorskip("keras")
    source = _cr_from_png(NIH_BOXES / "images" / f"{NIH_PNEUMONIA}.png", tmp_path)
    source_ds = dcmread(source)
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        with running_node(
            tmp_path / "node",
            worker={"pipeline": "cxr", "processes": 1},
            cxr={"models_dir": str(REPO / "models"), "batch_size": 4},
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.port}
            ],
        ) as node:
            [run] = storescu([source], node.port)
            assert run.returncode == 0
            node.wait_for(
                lambda s: s and all(v["state"] == "done" for v in s.values()), 300, "study done"
            )
            deadline = time.monotonic() + 120
            while node.status()["deliveries"]["pending"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert node.status()["deliveries"]["pending"] == 0
        [study] = orthanc.get("/studies")
        by_class: dict[str, list[Path]] = {}
        for inst in orthanc.get(f"/studies/{study}/instances"):
            tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
            if tags["SOPInstanceUID"] == source_ds.SOPInstanceUID:
                continue
            path = orthanc.download(inst["ID"], tmp_path / f"{inst['ID']}.dcm")
            by_class.setdefault(tags["SOPClassUID"], []).append(path)
        assert {k: len(v) for k, v in by_class.items()} == {
            SR_CLASS: 1,
            SC_CLASS: 1,
            GSPS_CLASS: 1,
            SEG_CLASS: 1,
        }
        for paths in by_class.values():
            errors, output = dciodvfy(paths[0])
            assert errors == [], output
            assert "PixelSpacing" not in dcmread(paths[0])
        sr = dcmread(by_class[SR_CLASS][0])
        rings, modalities, methods = [], [], []

        def walk(items):  # type: ignore[no-untyped-def]
            for item in items:
                name = item.get("ConceptNameCodeSequence")
                if item.ValueType == "SCOORD":
                    rings.append([round(float(v), 2) for v in item.GraphicData])
                if item.ValueType == "CODE" and name and name[0].CodeValue == "121139":
                    modalities.append(item.ConceptCodeSequence[0].CodeValue)
                if item.ValueType == "TEXT" and name and name[0].CodeValue == "111001":
                    methods.append(str(item.TextValue))
                walk(item.get("ContentSequence", []))

        walk(sr.ContentSequence)
        assert modalities == ["CR"]
        assert "cxr-opacity-detector" in methods  # TID 4019 of the boxes
        gsps = dcmread(by_class[GSPS_CLASS][0])
        referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source_ds.SOPInstanceUID
        boxes = [
            [round(float(v), 2) for v in g.GraphicData]
            for a in gsps.GraphicAnnotationSequence
            for g in a.GraphicObjectSequence
        ]
        assert boxes and all(b in rings for b in boxes)  # each GSPS box is an SR region
        seg = dcmread(by_class[SEG_CLASS][0])
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lung", "Opacity"]
    finally:
        orthanc.stop()
