"""``[http]``: health, readiness, Prometheus metrics and the status page of a running node.

The node runs as a real ``dicomnode serve`` subprocess with a receiving process and a
worker process of its own (``receive.processes = 2``, ``worker.processes = 1``), so the
metrics counted in those child processes must reach ``/metrics`` of the main process.
A study is sent with dcmtk's ``storescu``; a stranger's association is rejected with
dcmtk's ``echoscu``; the page is opened in headless Chromium.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from support import dcmtk, free_port, make_instance, running_node, storescu

pytestmark = pytest.mark.integration


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
        if found == wanted:
            return float(match.group(3))
    return None


def _wait_metric(port: int, name: str, at_least: float, timeout: float, **labels: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        _, text = _get(port, "/metrics")
        value = _sample(text, name, **labels)
        if value is not None and value >= at_least:
            return text
        time.sleep(0.3)
    raise AssertionError(f"{name}{labels} never reached {at_least}:\n{text}")


@pytest.mark.timeout(240)
def test_health_metrics_and_status_page_of_a_running_node(tmp_path: Path) -> None:
    http_port = free_port()
    with running_node(
        tmp_path,
        http={"port": http_port},
        receive={"processes": 2},
        worker={"processes": 1, "pipeline": "placeholder"},
    ) as node:
        assert _get(http_port, "/healthz") == (200, "ok\n")
        status, body = _get(http_port, "/readyz")
        ready = json.loads(body)
        assert status == 200, body
        assert ready["ready"] is True
        assert set(ready["checks"]) == {"database", "models", "disk", "receiver"}

        _, before = _get(http_port, "/metrics")
        assert _sample(before, "dicomnode_instances_received_total", status="success") in (None, 0)
        assert (_sample(before, "dicomnode_free_disk_bytes") or 0) > 0

        path = make_instance(tmp_path / "in", modality="CR", patient_id="PID-SECRET-42")
        study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        (run,) = storescu([path], node.port)
        assert run.returncode == 0, run.stderr
        stranger = subprocess.run(
            [
                dcmtk("echoscu"),
                "-aet",
                "STRANGER",
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(node.port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert stranger.returncode != 0

        # Counted in a receiving process, read by the main process.
        text = _wait_metric(
            http_port, "dicomnode_instances_received_total", 1, 30, status="success"
        )
        assert _sample(text, "dicomnode_cstore_duration_seconds_count") == 1
        assert (_sample(text, "dicomnode_associations_total", outcome="accepted") or 0) >= 1
        assert _sample(text, "dicomnode_associations_total", outcome="rejected") == 1
        # Counted in the worker process once the study completes and its job runs.
        text = _wait_metric(
            http_port, "dicomnode_job_duration_seconds_count", 1, 60, pipeline="placeholder"
        )
        assert _sample(text, "dicomnode_jobs", status="done") == 1
        assert _sample(text, "dicomnode_jobs", status="failed") == 0
        assert _sample(text, "dicomnode_deliveries", status="pending") == 0

        # A result object the node keeps for the study (as the worker writes them) is linked
        # from the page and served as it is.
        result = make_instance(node.data_dir / "results" / study_uid, modality="CR")
        status, page = _get(http_port, "/")
        assert status == 200
        assert study_uid in page
        assert "PID-SECRET-42" not in page, "patient IDs appear only when node.log_phi is true"
        link = f"/results/{study_uid}/{result.stem}.dcm"
        assert f'href="{link}"' in page
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{link}", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/dicom"
            assert r.read() == result.read_bytes()
        assert _get(http_port, f"/results/{study_uid}/..%2F..%2Fdicomnode.db.dcm")[0] == 404
        assert _get(http_port, "/models/no-such-model")[0] == 404
        assert node.proc is not None and node.proc.poll() is None


@pytest.mark.timeout(120)
def test_readyz_names_the_failing_check(tmp_path: Path) -> None:
    http_port = free_port()
    # A free-space floor no disk meets: the node runs, but is not ready to receive.
    with running_node(tmp_path, http={"port": http_port}, storage={"min_free_mb": 2**40}):
        status, body = _get(http_port, "/readyz")
        assert status == 503
        ready = json.loads(body)
        assert ready["failing"] == ["disk"]
        assert "storage.min_free_mb" in ready["checks"]["disk"]["detail"]
        assert _get(http_port, "/healthz")[0] == 200


@pytest.mark.timeout(180)
def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    from viewer.browser import chromium_binary, headless_chromium

    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    http_port = free_port()
    with running_node(
        tmp_path,
        http={"port": http_port},
        node={"log_phi": True},
        worker={"processes": 1, "pipeline": "placeholder"},
    ) as node:
        paths = [make_instance(tmp_path / "in", modality="CR", patient_id="PID-SHOWN-7")]
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        (run,) = storescu(paths, node.port)
        assert run.returncode == 0, run.stderr
        node.wait_for(
            lambda s: s.get(study_uid, {}).get("state") in ("done", "skipped"), 60, "the job"
        )
        shot = tmp_path / "status.png"
        with headless_chromium(chromium, tmp_path / "profile", width=1200, height=800) as browser:
            browser.navigate(f"http://127.0.0.1:{http_port}/")
            browser.wait_for("document.querySelector('#studies') !== null", 30, "the study table")
            rows: Any = browser.evaluate(
                "Array.from(document.querySelectorAll('#studies tr.study')).map(r => r.innerText)"
            )
            checks: Any = browser.evaluate(
                "Array.from(document.querySelectorAll('#checks td.ok')).length"
            )
            browser.screenshot(shot)
        assert len(rows) == 1 and study_uid in rows[0]
        assert "PID-SHOWN-7" in rows[0], "node.log_phi = true shows the Patient ID"
        assert checks == 4, "every readiness check is shown as ok"
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24]) == (1200, 800)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert image is not None and float(image.std()) > 5, "the screenshot is one flat colour"
