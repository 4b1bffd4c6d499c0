"""The embedded default configuration runs the shipped models, end to end.

The node is started with the repository's own ``config.toml``: only where it listens,
where it keeps its data, how long the quiet periods are and where results go are changed
(Orthanc stands in for the PACS). A real chest radiograph and a chest CT series built from
real slices are sent with dcmtk ``storescu``; both studies must be analysed by the models
under ``models/`` (checksums verified at start-up) and come back to Orthanc as an SR that
names those models.
"""

from __future__ import annotations

import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from pydicom import dcmread
from support import (
    NodeProcess,
    OrthancServer,
    dcmtk,
    free_port,
    shared_data,
    storescu,
    synthetic_ct_series,
    write_toml,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CXR_FILE = ("dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
CT_SLICES = ("dicom_ct", "tcia_covid19_ny_sbu_single_slices")


def _default_config(folder: Path, port: int, orthanc_port: int) -> Path:
    config = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    config["node"]["port"] = port
    config["storage"]["min_free_mb"] = 0
    config["completion"]["check_interval_s"] = 0.2
    config["completion"]["quiet_period_s"] = {"CR": 1.5, "DX": 1.5, "CT": 2.0, "default": 2.0}
    config["queue"]["poll_interval_s"] = 0.1
    for section in ("cxr", "ct"):  # relative to config.toml, which is written elsewhere here
        config[section]["models_dir"] = str(REPO / config[section]["models_dir"])
    config["destinations"] = [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
    ]
    return write_toml(folder / "config.toml", config)


def _manifest(name: str) -> dict[str, object]:
    return tomllib.loads((REPO / "models" / name / "manifest.toml").read_text(encoding="utf-8"))


def test_default_config_analyses_cxr_and_ct_with_the_shipped_models(tmp_path: Path) -> None:
    config = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    assert config["worker"]["pipeline"] == "chest", "the default must run the shipped models"
    cxr_file = shared_data(*CXR_FILE)
    slices = shared_data(*CT_SLICES)
    ct_series = synthetic_ct_series(
        [slices / "A048383__axial__19010410-30.dcm", slices / "A002304__axial__19010112-135.dcm"],
        tmp_path / "ct",
        20,
    )
    studies = {
        str(dcmread(cxr_file, stop_before_pixels=True).StudyInstanceUID): "cxr",
        str(dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID): "ct",
    }
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    port = free_port()
    node = NodeProcess(
        config=_default_config(tmp_path / "node", port, orthanc.port),
        port=port,
        log_path=tmp_path / "node" / "node.log",
    )
    try:
        node.start()
        for run in storescu([cxr_file, *ct_series], node.port):
            assert run.returncode == 0, run.stdout + run.stderr
        node.wait_for(
            lambda s: all(uid in s and s[uid]["state"] in ("done", "failed") for uid in studies),
            300,
            "both studies analysed",
        )
        deadline = time.monotonic() + 120
        while node.status()["deliveries"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.5)
        status = node.status()
        assert status["deliveries"]["pending"] == 0, status["undelivered"]
        for uid, study in node.studies().items():
            assert study["state"] == "done", (studies[uid], study)
        log = node.log()
        assert node.stop() == 0
    finally:
        if node.proc is not None:
            node.kill()
        srs = {}
        for study_id in orthanc.get("/studies"):
            for obj in orthanc.get(f"/studies/{study_id}/instances"):
                tags = orthanc.get(f"/instances/{obj['ID']}/simplified-tags")
                if tags["SOPClassUID"] == SR_CLASS:
                    srs[tags["StudyInstanceUID"]] = orthanc.download(obj["ID"])
        orthanc.stop()
    # Every model the default configuration names was loaded from models/, checksum verified.
    cxr, ct = config["cxr"], config["ct"]
    assert cxr["detector"] == "cxr-opacity-detector" and not cxr["gradcam_boxes"]
    names = [cxr["lung_mask"], *cxr["members"], cxr["detector"], ct["classifier"]]
    if cxr["strategy"] == "stacking":
        names.append(cxr["stacking"])
    for name in names:
        manifest = _manifest(name)
        assert f"loaded model {manifest['name']} {manifest['version']}" in log, name
    assert set(srs) == set(studies)
    for uid, kind in studies.items():
        dump = subprocess.run([dcmtk("dsrdump"), str(srs[uid])], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        expected = cxr["members"] if kind == "cxr" else [ct["classifier"]]
        for name in expected:
            manifest = _manifest(name)
            assert f'"{manifest["name"]}"' in dump.stdout, (kind, name)
        if kind == "ct":
            assert "Computed tomography of chest" in dump.stdout
