"""The viewer check: the node's SR opens in the OHIF viewer with its boxes on the image.

A chest X-ray goes to the node (tiny fixture models, boxes forced on); its SR and Grad-CAM
SC go to Orthanc, which also holds the image. OHIF (the prebuilt ``@ohif/app`` from
``deploy/install-viewer.sh``), served beside a same-origin proxy to Orthanc's DICOMweb
plugin (``tests/viewer/server.py``), opens the study in headless Chromium. The reader's
gesture is replayed (a double-click on the SR in the study browser), then the page's own
state is read, not its pixels:

* OHIF's annotation state holds one SR annotation per SR box (the lung region and every
  opacity box): its UID is the box's Tracking Unique Identifier, it sits on the source
  image, and its polyline is the SR's GraphicData (within a pixel);
* OHIF's measurement service holds one measurement per SR box (hydrated from the SR),
  each on the source image at that box's coordinates;
* the page raised no uncaught error. OHIF runs as shipped: the served configuration has
  no SR customization (no ``onBeforeSRAddMeasurement``).

A screenshot is kept as ``test-artifacts/viewer-<study>.png``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from support import (
    REPO_ROOT,
    OrthancServer,
    running_node,
    shared_data,
    storescu,
    synthetic_ct_series,
)
from viewer import ohif
from viewer.browser import BrowserError, chromium_binary, headless_chromium
from viewer.server import ViewerServer, ohif_dist, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
ARTIFACTS = REPO_ROOT / "test-artifacts"
WIDTH, HEIGHT = 1400, 900
#: Codes in the report (DICOM PS3.16): Measurement Group, Tracking Identifier, Tracking
#: Unique Identifier, Finding; the findings of the lung region and of an opacity box.
MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_ID = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")
FINDING = ("121071", "DCM")
LUNG = ("39607008", "SCT")
OPACITY = ("112033", "DCM")
#: How far (pixels) a coordinate in the viewer may be from the SR's.
TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class SrBox:
    """One measurement group of the SR with a region on an image."""

    tracking_uid: str
    tracking_id: str
    finding: tuple[str, str] | None
    referenced_sop: str
    points: tuple[tuple[float, float], ...]


def _code(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str] | None:
    sequence = item.get(attribute)
    return (sequence[0].CodeValue, sequence[0].CodingSchemeDesignator) if sequence else None


def _sr_boxes(sr: Dataset) -> list[SrBox]:
    """Every measurement group of the SR that has an SCOORD: its identity and its points."""
    groups: list[Dataset] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "CONTAINER" and _code(item) == MEASUREMENT_GROUP:
                groups.append(item)
            else:
                walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    boxes = []
    for group in groups:
        items = list(group.ContentSequence)
        by_concept = {_code(item): item for item in items}
        for scoord in (item for item in items if item.ValueType == "SCOORD"):
            flat = [float(v) for v in scoord.GraphicData]
            finding = by_concept.get(FINDING)
            boxes.append(
                SrBox(
                    tracking_uid=str(by_concept[TRACKING_UID].UID),
                    tracking_id=str(by_concept[TRACKING_ID].TextValue),
                    finding=_code(finding, "ConceptCodeSequence") if finding else None,
                    referenced_sop=str(
                        scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    ),
                    points=tuple(zip(flat[0::2], flat[1::2], strict=True)),
                )
            )
    return boxes


def _distance(points: list[list[float]], box: SrBox) -> float:
    """Largest coordinate difference between a polyline and the box's, point by point."""
    if len(points) != len(box.points):
        return float("inf")
    pairs = zip(points, box.points, strict=True)
    return max(abs(a - b) for p, q in pairs for a, b in zip(p, q, strict=True))


def _bounds(points: Any) -> tuple[float, float, float, float]:
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _bounds_distance(points: list[list[float]], box: SrBox) -> float:
    """Largest difference between the bounding rectangles (a RectangleROI keeps 4 corners)."""
    if not points:
        return float("inf")
    return max(abs(a - b) for a, b in zip(_bounds(points), _bounds(box.points), strict=True))


def _components() -> tuple[str, Path]:
    """Chromium and the OHIF build, or skip saying which is missing and how to get it."""
    chromium = chromium_binary()
    if chromium is None:
        pytest.skip("Chromium is not installed (bash deploy/install-system-packages.sh)")
    dist = ohif_dist()
    if dist is None:
        pytest.skip(
            "the OHIF viewer is not installed (bash deploy/install-viewer.sh; needs node/npm "
            "and the npm registry once)"
        )
    if not Path(OrthancServer.DICOMWEB_PLUGIN).exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return chromium, dist


def _orthanc_instances(
    orthanc: OrthancServer, study_uid: str, source_sop: str
) -> dict[str, list[str]]:
    """Orthanc's instance IDs in the study, by SOP Class UID, without the source image."""
    [study_id] = [
        study["ID"]
        for study in orthanc.get("/studies?expand")
        if study["MainDicomTags"]["StudyInstanceUID"] == study_uid
    ]
    by_class: dict[str, list[str]] = {}
    for instance in orthanc.get(f"/studies/{study_id}/instances"):
        tags = orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
        if tags["SOPInstanceUID"] != source_sop:  # it may be a Secondary Capture itself
            by_class.setdefault(tags["SOPClassUID"], []).append(instance["ID"])
    return by_class


def _download(orthanc: OrthancServer, instance_id: str) -> Dataset:
    return dcmread(orthanc.download(instance_id))


def _check_png(path: Path) -> None:
    """A real screenshot: a PNG of the browser's size with something on it."""
    assert path.is_file(), f"no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    assert struct.unpack(">II", data[16:24]) == (WIDTH, HEIGHT)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image is not None, "the screenshot does not decode"
    assert float(image.std()) > 10, "the screenshot is (nearly) one flat colour"


@pytest.mark.timeout(300)
def test_sr_boxes_open_as_measurements_in_ohif(tmp_path: Path) -> None:
    """Node -> Orthanc -> OHIF: a reader who opens the SR sees its boxes on the image."""
    chromium, dist = _components()
    pytest.importorskip("keras")
    from fixture_models import cxr_node_sections, write_cxr_models

    source = shared_data(
        "dicom_cxr", "chest", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    )
    source_ds = dcmread(source, stop_before_pixels=True)
    study_uid, source_sop = str(source_ds.StudyInstanceUID), str(source_ds.SOPInstanceUID)
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        # The PACS holds the image (from the modality) and gets the results from the node.
        [run] = storescu([source], orthanc.port, called_ae="ORTHANC")
        assert run.returncode == 0, run.stderr
        models = write_cxr_models(tmp_path / "models")
        with running_node(
            tmp_path / "node",
            **cxr_node_sections(models, orthanc.port, abnormal_threshold=0.0),
        ) as node:
            [run] = storescu([source], node.port)
            assert run.returncode == 0, run.stderr
            # SR and SC, and (with the detector) a GSPS and a SEG: every one delivered.
            deadline = time.monotonic() + 120
            status = node.status()
            while (
                status["deliveries"]["delivered"] < 2 or status["undelivered"]
            ) and time.monotonic() < deadline:
                time.sleep(0.5)
                status = node.status()
            assert status["deliveries"]["delivered"] >= 2, status["undelivered"]
            assert not status["undelivered"], status["undelivered"]
        by_class = _orthanc_instances(orthanc, study_uid, source_sop)
        assert len(by_class.get(SR_CLASS, [])) == 1 and len(by_class.get(SC_CLASS, [])) == 1
        sr = _download(orthanc, by_class[SR_CLASS][0])
        boxes = _sr_boxes(sr)
        findings = [box.finding for box in boxes]
        assert findings.count(LUNG) == 1, f"no single lung region box in the SR: {boxes}"
        assert OPACITY in findings, f"the SR has no opacity box besides the lung region: {boxes}"
        assert {box.referenced_sop for box in boxes} == {source_sop}

        shot = ARTIFACTS / f"viewer-{study_uid}.png"
        shot.unlink(missing_ok=True)
        with (
            serving(dist, f"http://127.0.0.1:{orthanc.http_port}/dicom-web") as server,
            headless_chromium(chromium, tmp_path / "chromium", width=WIDTH, height=HEIGHT) as page,
        ):
            # Stock OHIF: no SR customization may help our report open.
            assert "onBeforeSRAddMeasurement" not in server.app_config
            try:
                page.navigate(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
                ohif.wait_until_showing(page, source_sop, timeout=60)
                ohif.open_series(page, str(sr.SeriesDescription))
                state = ohif.wait_for_sr(
                    page, annotations=len(boxes), measurements=len(boxes), timeout=60
                )
                ohif.open_measurements_panel(page)
                ohif.settle(page)
            finally:
                # Kept in every case: on a failure it shows what the page looked like.
                with contextlib.suppress(BrowserError, OSError):
                    page.screenshot(shot)
            page_errors = [
                e for e in page.events if e.startswith("exception") or "Error Boundary" in e
            ]
            context = (
                f"\nviewer state: {json.dumps(state, indent=1)}"
                f"\npage events (tail): {json.dumps(page.events[-25:], indent=1)}"
                f"\nrequests (tail): {json.dumps(server.requests[-25:], indent=1)}"
            )
    finally:
        orthanc.stop()

    assert page_errors == [], f"the viewer raised errors: {page_errors}{context}"
    # Every SR box, the opacity boxes included, is an SR annotation on the source image, at
    # the SR's coordinates: OHIF read the report over DICOMweb and placed it on the image.
    annotations = {a["uid"]: a for a in state["annotations"]}
    for box in boxes:
        annotation = annotations.get(box.tracking_uid)
        assert annotation is not None, f"{box.tracking_id} is not in the viewer{context}"
        assert annotation["sop"] == source_sop, f"{box.tracking_id} is not on the image{context}"
        assert len(annotation["polylines"]) == 1, context
        distance = _distance(annotation["polylines"][0], box)
        assert distance <= TOLERANCE_PX, f"{box.tracking_id} is {distance} px off{context}"
    # Hydration made a measurement out of every SR box (the lung region a RectangleROI, each
    # opacity box too), on the source image at the SR's coordinates, and nothing else.
    measurements = state["measurements"]
    assert len(measurements) == len(boxes), (
        f"{len(measurements)} measurements for {len(boxes)} SR boxes{context}"
    )
    unmatched = list(boxes)
    for measurement in measurements:
        assert measurement["sop"] == source_sop, f"measurement not on the image{context}"
        nearest = min(unmatched, key=lambda box: _bounds_distance(measurement["points"], box))
        distance = _bounds_distance(measurement["points"], nearest)
        assert distance <= TOLERANCE_PX, f"measurement {measurement} is no SR box{context}"
        unmatched.remove(nearest)
    assert not unmatched, f"SR boxes without a measurement: {unmatched}{context}"
    assert source_sop in state["shown"], f"the source image is not on screen{context}"
    _check_png(shot)


@pytest.mark.timeout(300)
def test_ct_sr_evidence_slices_open_in_ohif(tmp_path: Path) -> None:
    """Node -> Orthanc -> OHIF for a chest CT: every region of the CT report (the lung region
    of each evidence slice) shows on its slice, and hydrates into a measurement there."""
    chromium, dist = _components()
    pytest.importorskip("keras")
    from fixture_models import ct_node_sections, write_ct_model

    slices = shared_data("dicom_ct", "tcia_covid19_ny_sbu_single_slices")
    series = synthetic_ct_series(
        [slices / "A048383__axial__19010410-30.dcm", slices / "A002304__axial__19010112-135.dcm"],
        tmp_path / "ct",
        12,
    )
    study_uid = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    series_sops = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        for run in storescu(series, orthanc.port, called_ae="ORTHANC"):
            assert run.returncode == 0, run.stderr
        models = write_ct_model(tmp_path / "models")
        sections = ct_node_sections(models, orthanc.port, selection={"min_slices": 5})
        with running_node(tmp_path / "node", **sections) as node:  # type: ignore[arg-type]
            for run in storescu(series, node.port):
                assert run.returncode == 0, run.stderr
            deadline = time.monotonic() + 180
            while node.status()["deliveries"]["delivered"] < 4 and time.monotonic() < deadline:
                time.sleep(0.5)
            status = node.status()
            assert status["deliveries"]["delivered"] == 4, status["undelivered"]  # SR + 3 SC
        by_class = _orthanc_instances(orthanc, study_uid, source_sop="")
        [sr_id] = by_class[SR_CLASS]
        sr = _download(orthanc, sr_id)
        boxes = _sr_boxes(sr)
        assert boxes, "the CT report has no region on a slice"
        assert {box.referenced_sop for box in boxes} <= series_sops

        shot = ARTIFACTS / f"viewer-ct-{study_uid}.png"
        shot.unlink(missing_ok=True)
        with (
            serving(dist, f"http://127.0.0.1:{orthanc.http_port}/dicom-web") as server,
            headless_chromium(chromium, tmp_path / "chromium", width=WIDTH, height=HEIGHT) as page,
        ):
            try:
                page.navigate(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
                ohif.wait_until_ready(page, timeout=60)
                ohif.open_series(page, str(sr.SeriesDescription))
                state = ohif.wait_for_sr(
                    page, annotations=len(boxes), measurements=len(boxes), timeout=60
                )
                ohif.open_measurements_panel(page)
                ohif.settle(page)
            finally:
                with contextlib.suppress(BrowserError, OSError):
                    page.screenshot(shot)
            page_errors = [
                e for e in page.events if e.startswith("exception") or "Error Boundary" in e
            ]
            context = (
                f"\nviewer state: {json.dumps(state, indent=1)}"
                f"\npage events (tail): {json.dumps(page.events[-25:], indent=1)}"
            )
    finally:
        orthanc.stop()
    assert page_errors == [], f"the viewer raised errors: {page_errors}{context}"
    annotations = {a["uid"]: a for a in state["annotations"]}
    for box in boxes:
        annotation = annotations.get(box.tracking_uid)
        assert annotation is not None, f"{box.tracking_id} is not in the viewer{context}"
        assert annotation["sop"] == box.referenced_sop, f"{box.tracking_id}: wrong slice{context}"
        distance = _distance(annotation["polylines"][0], box)
        assert distance <= TOLERANCE_PX, f"{box.tracking_id} is {distance} px off{context}"
    measurements = state["measurements"]
    assert len(measurements) == len(boxes), (
        f"{len(measurements)} measurements for {len(boxes)} SR regions{context}"
    )
    unmatched = list(boxes)
    for measurement in measurements:
        # On its region's slice, at the region's coordinates (slices made from the same
        # source image have the same region, so the slice decides).
        matches = [
            b
            for b in unmatched
            if b.referenced_sop == measurement["sop"]
            and _bounds_distance(measurement["points"], b) <= TOLERANCE_PX
        ]
        assert matches, f"measurement {measurement} is no SR region on its slice{context}"
        unmatched.remove(matches[0])
    # Hydration moved the viewer to a measured slice (the reader sees a region at once).
    measured = {m["sop"] for m in measurements}
    assert measured & set(state["shown"]), f"no measured slice is on screen{context}"
    _check_png(shot)


class _EchoUpstream(BaseHTTPRequestHandler):
    """A stand-in DICOMweb server: echoes the request as JSON, streams a large binary
    answer (chunked, no length) under ``/big``, and answers 404 with a body under ``/missing``."""

    protocol_version = "HTTP/1.1"
    BIG = bytes(range(256)) * 4096  # 1 MiB

    def _answer(self) -> None:
        if self.path.endswith("/big"):
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/octet-stream"')
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(self.BIG), 100_000):
                chunk = self.BIG[start : start + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        length = int(self.headers.get("Content-Length") or 0)
        echo = {
            "method": self.command,
            "path": self.path,
            "accept": self.headers.get("Accept"),
            "content_type": self.headers.get("Content-Type"),
            "accept_encoding": self.headers.get("Accept-Encoding"),
            "body": self.rfile.read(length).decode() if length else "",
        }
        body = json.dumps(echo).encode()
        self.send_response(404 if self.path.endswith("/missing") else 200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@contextlib.contextmanager
def _echo_upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _request(
    server: ViewerServer, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        names = {k.replace("_", "-"): v for k, v in headers.items()}
        connection.request(method, path, body=body, headers=names)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_viewer_server_serves_the_app_and_proxies_dicomweb(tmp_path: Path) -> None:
    """The same-origin server the viewer test relies on, against a stand-in upstream: OHIF's
    files, the generated configuration, the single-page-app fallback, and a proxy that passes
    method, path, query, the content headers and the body, and streams answers back."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<!doctype html><title>OHIF</title>")
    (dist / "app.bundle.js").write_text("console.log('app');")
    (dist / "app-config.js").write_text("window.config = {dataSources: ['the public demo']};")
    (tmp_path / "secret.txt").write_text("outside the dist")
    with (
        _echo_upstream() as port,
        serving(dist, f"http://127.0.0.1:{port}/orthanc/dicom-web") as server,
    ):
        status, headers, body = _request(server, "GET", "/app.bundle.js")
        assert (status, body) == (200, b"console.log('app');")
        assert headers["Content-Type"] == "text/javascript"
        for route in ("/", "/viewer?StudyInstanceUIDs=1.2.3", "/%2e%2e/secret.txt"):
            status, headers, body = _request(server, "GET", route)
            assert (status, body) == (200, b"<!doctype html><title>OHIF</title>"), route
            assert headers["Content-Type"] == "text/html"
        status, _, body = _request(server, "GET", "/app-config.js")
        config = body.decode()
        assert status == 200 and "the public demo" not in config
        assert '"@ohif/extension-default.dataSourcesModule.dicomweb"' in config
        assert '"routerBasename": "/"' in config
        for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
            assert f'"{root}": window.location.origin + "/dicom-web"' in config

        status, headers, body = _request(
            server,
            "POST",
            "/dicom-web/studies?PatientID=X%5EY&limit=5",
            b'{"ok": 1}',
            Accept="application/dicom+json",
            Content_Type="application/json",
            Accept_Encoding="gzip",
        )
        assert status == 200 and headers["Content-Type"] == "application/dicom+json"
        assert json.loads(body) == {
            "method": "POST",
            "path": "/orthanc/dicom-web/studies?PatientID=X%5EY&limit=5",
            "accept": "application/dicom+json",
            "content_type": "application/json",
            "accept_encoding": "identity",  # the proxy's own: plain bytes, not the browser's gzip
            "body": '{"ok": 1}',
        }
        status, _, body = _request(server, "DELETE", "/dicom-web/studies/1.2.3/missing")
        assert status == 404 and json.loads(body)["method"] == "DELETE"
        status, headers, body = _request(server, "GET", "/dicom-web/studies/1/series/2/big")
        assert status == 200 and body == _EchoUpstream.BIG
        assert headers["Content-Type"].startswith("multipart/related")
        assert "Transfer-Encoding" not in headers
        assert any("/dicom-web/studies/1/series/2/big" in line for line in server.requests)
