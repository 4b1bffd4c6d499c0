"""The OHIF viewer's prebuilt files and a DICOMweb proxy to Orthanc, on one origin.

OHIF runs in the browser and fetches its studies with DICOMweb. Serving the app and the
DICOMweb root from the same origin means no CORS configuration in Orthanc and no
cross-origin warnings in the viewer: ``/dicom-web/*`` is forwarded to Orthanc's DICOMweb
plugin, ``/app-config.js`` is the configuration the test writes, any other existing file
comes from OHIF's ``dist/``, and every other path gets ``index.html`` (OHIF is a single-page
app whose routes, such as ``/viewer``, are not files).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support import REPO_ROOT

#: The OHIF release deploy/install-viewer.sh installs (keep the two identical).
OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO_ROOT / ".cache" / "viewer" / f"ohif-app-{OHIF_VERSION}" / "dist"

#: Request headers passed on to Orthanc (the rest, e.g. Accept-Encoding, are the proxy's own).
_FORWARD_REQUEST = ("Accept", "Content-Type", "Range", "If-None-Match", "If-Modified-Since")
#: Response headers passed back from Orthanc (hop-by-hop ones such as Transfer-Encoding are not).
_FORWARD_RESPONSE = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "ETag",
    "Last-Modified",
    "Cache-Control",
)
_CHUNK = 64 * 1024


def ohif_dist() -> Path | None:
    """The installed OHIF ``dist/`` folder, or None when deploy/install-viewer.sh has not run."""
    if (OHIF_DIST / "index.html").is_file() and (OHIF_DIST / "app-config.js").is_file():
        return OHIF_DIST
    return None


def app_config(dicomweb_path: str = "/dicom-web") -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on this origin, nothing else.

    The roots are built from ``window.location.origin`` in the page, so the configuration
    does not depend on the port the server happens to get. Dialogs that would cover the
    viewer in a screenshot (investigational-use notice, CPU-rendering notice, the guided
    tour) are turned off, and so are confirmation prompts: opening an SR that OHIF can
    hydrate then hydrates it straight away (its measurements go to the measurement service
    and are tracked) instead of asking first. No SR-specific customization: our reports
    open in stock OHIF.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "Orthanc (test PACS)",
            "name": "orthanc",
            "qidoRoot": "@ROOT@",
            "wadoRoot": "@ROOT@",
            "wadoUriRoot": "@ROOT@",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "name": "dicomnode viewer test",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {
            "ohif.tours": {"$set": []},
        },
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "disableConfirmationPrompts": True,
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    root = f"window.location.origin + {json.dumps(dicomweb_path)}"
    text = json.dumps(config, indent=2).replace('"@ROOT@"', root)
    header = "/** Written by tests/viewer/server.py for the viewer test. */"
    return f"{header}\nwindow.config = {text};\n"


class _Handler(SimpleHTTPRequestHandler):
    """Static OHIF files with a single-page-app fallback, and the ``/dicom-web`` proxy."""

    server: ViewerServer  # type: ignore[assignment]
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    # -- routing ---------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_PUT(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        prefix = self.server.dicomweb_path
        if path == prefix or path.startswith(prefix + "/"):
            self._proxy()
        elif self.command not in ("GET", "HEAD"):
            self.send_error(405)
        elif path == "/app-config.js":
            self._send_bytes(self.server.app_config.encode(), "text/javascript")
        else:
            self._static(path)

    # -- static files ----------------------------------------------------------------------

    def _static(self, path: str) -> None:
        root = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            candidate = root / "index.html"  # a route of the single-page app, not a file
        ctype = self.guess_type(str(candidate))
        try:
            handle = candidate.open("rb")
        except OSError:
            self.send_error(404)
            return
        with handle:
            size = candidate.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-store" if ctype == "text/html" else "max-age=600")
            self.end_headers()
            if self.command == "GET":
                shutil.copyfileobj(handle, self.wfile, _CHUNK)

    def _send_bytes(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    # -- DICOMweb proxy ----------------------------------------------------------------------

    def _proxy(self) -> None:
        """Forward the request to Orthanc and stream its answer back, status included."""
        split = urllib.parse.urlsplit(self.path)
        target = self.server.upstream_root + split.path[len(self.server.dicomweb_path) :]
        if split.query:
            target += "?" + split.query
        headers = {k: v for k in _FORWARD_REQUEST if (v := self.headers.get(k)) is not None}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        connection = http.client.HTTPConnection(
            self.server.upstream_host, self.server.upstream_port, timeout=60
        )
        try:
            try:
                connection.request(self.command, target, body=body, headers=headers)
                response = connection.getresponse()
            except OSError as exc:
                self.send_error(502, f"DICOMweb upstream unreachable: {exc}")
                return
            self.send_response(response.status, response.reason)
            for name in _FORWARD_RESPONSE:
                value = response.getheader(name)
                if value is not None:
                    self.send_header(name, value)
            # Without a Content-Length the body ends when this connection closes (HTTP/1.0).
            self.end_headers()
            if self.command == "HEAD":
                return
            while chunk := response.read(_CHUNK):
                self.wfile.write(chunk)
        finally:
            connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log_request_line(format % args)


class ViewerServer(ThreadingHTTPServer):
    """OHIF and the DICOMweb proxy on ``127.0.0.1:<port>`` (a free port unless given).

    ``upstream`` is Orthanc's DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
    Requests are logged in memory (``requests``) for failure messages.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, dist: Path, upstream: str, port: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, not {upstream!r}")
        self.dist = dist.resolve()
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.upstream_root = parsed.path.rstrip("/")
        self.dicomweb_path = "/dicom-web"
        self.app_config = app_config(self.dicomweb_path)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def log_request_line(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed request in ``requests`` (e.g. the page went away mid-answer) instead
        of printing a traceback."""
        error = sys.exc_info()[1]
        self.log_request_line(f"error answering {client_address}: {error!r}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="viewer-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(10)


@contextlib.contextmanager
def serving(dist: Path, upstream: str) -> Iterator[ViewerServer]:
    """Run a :class:`ViewerServer` for the ``with`` block; always stopped at the end."""
    server = ViewerServer(dist, upstream)
    server.start()
    try:
        yield server
    finally:
        server.stop()
