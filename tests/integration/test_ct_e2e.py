"""Chest CT end to end: storescu -> node (chest pipeline) -> Orthanc holds the SR and SCs.

The study is built by the test from real slices (new UIDs and positions): a 20-slice
axial series, a coronal reformat series and a JPEG 2000 upper-abdomen series. The node
runs the ``chest`` pipeline with a tiny random DenseNet; what comes back must be
dciodvfy-clean and reference the slices the pipeline chose as evidence.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

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
    synthetic_ct_series,
    transfer_syntax_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SINGLES = ("dicom_ct", "tcia_covid19_ny_sbu_single_slices")


def test_ct_study_comes_back_with_sr_and_scs_referencing_the_evidence(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from fixture_models import ct_node_sections, cxr_node_sections, write_ct_model, write_cxr_models
    from sqlalchemy import select

    from dicomnode.config import load_settings
    from dicomnode.db import Database, Job, Study

    folder = shared_data(*SINGLES)
    sources = [
        folder / "A048383__axial__19010410-30.dcm",
        folder / "A002304__axial__19010112-135.dcm",
        folder / "A058062__axial__19001231-084.dcm",  # abdominal: no lung, not classified
    ]
    axial = synthetic_ct_series(sources, tmp_path / "axial", 20)
    study_uid = str(dcmread(axial[0], stop_before_pixels=True).StudyInstanceUID)
    coronal = synthetic_ct_series(
        [folder / "A072894__19010103-Chest-058.dcm"],
        tmp_path / "coronal",
        3,
        study_uid=study_uid,
        series_description="CHEST CORONAL",
    )
    for path in coronal:
        ds = dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"]
        ds.save_as(path)
    # A JPEG 2000 series of the upper abdomen (BodyPartExamined PARTIALBODY): received as
    # JPEG 2000, read, and skipped as not chest.
    abdomen = synthetic_ct_series(
        dicom_files(shared_data("dicom_ct", "totalsegmentator_example_ct_series_j2k"))[:6],
        tmp_path / "j2k",
        6,
        study_uid=study_uid,
        series_description="CT Body 3.0",
        body_part="PARTIALBODY",
        spacing_mm=2.0,
    )
    assert transfer_syntax_of(abdomen[0]) == "1.2.840.10008.1.2.4.90"
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        ct_models = write_ct_model(tmp_path / "models")
        write_cxr_models(tmp_path / "models")
        sections = cxr_node_sections(tmp_path / "models", orthanc.port)
        sections.update(
            {
                k: v
                for k, v in ct_node_sections(
                    ct_models, orthanc.port, pipeline="chest", selection={"min_slices": 5}
                ).items()
                if k in ("worker", "ct")
            }
        )
        with running_node(tmp_path / "node", **sections) as node:  # type: ignore[arg-type]
            for run in storescu(axial + coronal + abdomen, node.port):
                assert run.returncode == 0, run.stdout + run.stderr
            node.wait_for(
                lambda s: study_uid in s and s[study_uid]["state"] in ("done", "skipped", "failed"),
                240,
                "the CT study analysed",
            )
            deadline = time.monotonic() + 120
            while node.status()["deliveries"]["pending"] and time.monotonic() < deadline:
                time.sleep(0.5)
            status = node.status()
            assert status["deliveries"]["pending"] == 0, status["undelivered"]
            [study] = node.studies().values()
            assert study["state"] == "done", study
            # status shows what the analysis left out, by code.
            assert study["reason"].startswith("ct: ")
            assert "skipped series: 1 not-chest, 1 reformat" in study["reason"]
            assert "slices not classified: " in study["reason"] and "no-lung" in study["reason"]
            assert "1 not-chest, 1 reformat" in node.cli("status").stdout
            db = Database(load_settings(node.config).database.url)
            with db.read() as session:
                [summary_json] = session.execute(
                    select(Job.summary).join(Study, Job.study_id == Study.id)
                ).scalars()
            assert "ct pipeline ready" in node.log()
        summary = json.loads(summary_json)
        ct = summary["ct"]
        assert summary["pipeline"] == "chest" and summary["cxr"] is None
        assert ct["selection"]["chosen"]["slices"] == 20
        skipped = sorted((s["code"], s["detail"]) for s in ct["selection"]["skipped_series"])
        assert skipped == [
            ("not-chest", "BodyPartExamined PARTIALBODY"),
            ("reformat", "ImageType REFORMATTED"),
        ]
        assert ct["slices_classified"] < 20 and ct["slices_skipped"]["no-lung"] > 0
        evidence = [e["sop_instance_uid"] for e in ct["evidence"]]
        assert len(evidence) == 3

        [orthanc_study] = orthanc.get("/studies")
        objects = orthanc.get(f"/studies/{orthanc_study}/instances")
        ours = []
        for obj in objects:
            tags = orthanc.get(f"/instances/{obj['ID']}/simplified-tags")
            if tags["SOPClassUID"] in (SR_CLASS, SC_CLASS):
                ours.append((tags["SOPClassUID"], obj["ID"]))
        assert sorted(c for c, _ in ours) == sorted([SR_CLASS, SC_CLASS, SC_CLASS, SC_CLASS])
        sc_sources = []
        for kind, instance_id in ours:
            path = orthanc.download(instance_id, tmp_path / f"{instance_id}.dcm")
            assert dciodvfy(path)[0] == [], kind
            ds = dcmread(path)
            assert ds.StudyInstanceUID == study_uid
            if kind == SC_CLASS:
                sc_sources.append(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                assert ds.BurnedInAnnotation == "YES"
            else:
                dump = subprocess.run(
                    [dcmtk("dsrdump"), str(path)], capture_output=True, text=True
                ).stdout
                assert "Computed tomography of chest" in dump and "COVID-19" in dump
                referenced = [
                    item.ReferencedSOPInstanceUID
                    for e in ds.CurrentRequestedProcedureEvidenceSequence
                    for s in e.ReferencedSeriesSequence
                    for item in s.ReferencedSOPSequence
                ]
                assert sorted(referenced) == sorted(evidence)
        assert sorted(sc_sources) == sorted(evidence)
        # The evidence slices are the most probable chest slices of the axial series.
        axial_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in axial}
        assert set(evidence) <= axial_uids
        top = sorted(ct["slice_probabilities"], reverse=True)[:3]
        assert [e["probability"] for e in ct["evidence"]] == pytest.approx(top, abs=1e-4)
    finally:
        orthanc.stop()
