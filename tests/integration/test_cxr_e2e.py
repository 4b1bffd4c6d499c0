"""The node runs the chest X-ray pipeline on what storescu sends (tiny fixture models)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import running_node, shared_data, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_chest_studies_are_analysed_and_others_skipped_with_a_reason(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from fixture_models import cxr_node_sections, write_cxr_models

    chest = shared_data(
        "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    # A lateral thorax that says so only in AcquisitionDeviceProcessingDescription.
    lateral = shared_data("dicom_cxr", "chest", "highdicom_dx_image.dcm")
    leg = shared_data("dicom_cxr", "non_chest_radiographs", "pydicom-data_RG3_J2KR.dcm")
    models = write_cxr_models(tmp_path / "models")
    with running_node(
        tmp_path / "node",
        **cxr_node_sections(models),
    ) as node:
        for run in storescu([chest, lateral, leg], node.port):
            assert run.returncode == 0, run.stdout + run.stderr
        studies = node.wait_for(
            lambda s: len(s) == 3 and all(v["state"] in ("done", "skipped") for v in s.values()),
            120,
            "all three studies analysed",
        )
        states = sorted((v["state"], v.get("reason")) for v in studies.values())
        assert states == [
            ("done", None),
            ("skipped", "no frontal chest radiograph: 1 lateral-view (description says LATERAL)"),
            ("skipped", "no frontal chest radiograph: 1 not-chest (BodyPartExamined EXTREMITY)"),
        ]
        assert "not-chest" in node.cli("status").stdout
        assert "cxr pipeline ready" in node.log()
