"""The node's small HTTP server (``[http]``): health, readiness, metrics, a status page.

Built on Starlette (routing, responses) served by uvicorn in a thread of the
``serve`` main process; the page is rendered from Jinja2 templates shipped in
``dicomnode/ops/templates``. Everything is read-only.

* ``GET /healthz``: 200 while the process answers.
* ``GET /readyz``: 200 when the database answers, the models are loaded (every
  worker process started), the disk has more free space than ``storage.min_free_mb``
  and the receiver listens; otherwise 503, naming each failing check.
* ``GET /metrics``: Prometheus text format: the counters and histograms of every
  node process (:mod:`dicomnode.metrics`) and gauges read at scrape time
  (jobs and deliveries by status, free disk bytes).
* ``GET /``: recent studies (state, reason, findings, result objects), running and
  failed jobs, undelivered results, and the models with their versions and cards.
* ``GET /results/STUDY_UID/SOP_UID.dcm``: a result object the node made.
* ``GET /models/NAME``: that model's card.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from starlette.routing import Route

from dicomnode import __version__, metrics
from dicomnode.config import Settings
from dicomnode.db import Database, DeliveryStatus, JobStatus
from dicomnode.errors import DicomNodeError, InvalidUIDError
from dicomnode.ops import overview
from dicomnode.storage import validate_uid

log = logging.getLogger("dicomnode.http")


@dataclass
class NodeState:
    """What ``serve`` tells the HTTP server about its processes, for ``/readyz``.

    ``receiving`` and ``models_loaded`` are set once the receiver listens and every
    worker process has loaded its pipeline; ``dead_children`` (set by ``serve``)
    names child processes that are not running now.
    """

    receiving: threading.Event = field(default_factory=threading.Event)
    models_loaded: threading.Event = field(default_factory=threading.Event)
    dead_children: Callable[[], list[str]] = field(default=lambda: [])


@dataclass(frozen=True)
class Check:
    """One readiness check's outcome."""

    name: str
    ok: bool
    detail: str


def readiness(settings: Settings, db: Database, state: NodeState) -> list[Check]:
    """Every readiness check, in a fixed order."""
    checks = []
    try:
        with db.read() as session:
            session.execute(text("SELECT 1"))
        checks.append(Check("database", True, db.dialect))
    except Exception as exc:  # any driver error means "not reachable"
        checks.append(Check("database", False, f"not reachable: {type(exc).__name__}: {exc}"))
    dead = state.dead_children()
    dead_workers = [name for name in dead if name.startswith("worker")]
    if settings.worker.processes == 0:
        checks.append(Check("models", True, "no worker processes here (worker.processes = 0)"))
    elif not state.models_loaded.is_set():
        checks.append(Check("models", False, "worker processes are still loading the models"))
    elif dead_workers:
        checks.append(Check("models", False, f"not running: {', '.join(dead_workers)}"))
    else:
        checks.append(Check("models", True, f"pipeline {settings.worker.pipeline} loaded"))
    floor = settings.storage.min_free_mb * 2**20
    try:
        free = shutil.disk_usage(settings.node.data_dir).free
        checks.append(
            Check(
                "disk",
                free > floor,
                f"{free // 2**20} MiB free, floor {settings.storage.min_free_mb} MiB "
                "(storage.min_free_mb)",
            )
        )
    except OSError as exc:
        checks.append(Check("disk", False, f"{settings.node.data_dir}: {exc.strerror}"))
    dead_receivers = [name for name in dead if name.startswith("receiver")]
    if not state.receiving.is_set():
        checks.append(Check("receiver", False, "not listening yet"))
    elif dead_receivers:
        checks.append(Check("receiver", False, f"not running: {', '.join(dead_receivers)}"))
    else:
        node = settings.node
        checks.append(Check("receiver", True, f"{node.ae_title} on {node.bind}:{node.port}"))
    return checks


class _ScrapeTimeCollector:
    """Gauges read when Prometheus scrapes: jobs and deliveries by status, free disk."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("dicomnode_database_up", "Whether the database answered")
        try:
            jobs, deliveries = overview.counts_by_status(self.db)
        except Exception:  # the scrape must still answer; dicomnode_database_up says why
            log.warning("metrics: the database did not answer", exc_info=True)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            gauge = GaugeMetricFamily(
                "dicomnode_jobs", "Analysis jobs by status", labels=["status"]
            )
            for status in JobStatus:
                gauge.add_metric([status.value], jobs.get(status.value, 0))
            yield gauge
            gauge = GaugeMetricFamily(
                "dicomnode_deliveries",
                "Outbox rows (result x destination) by status",
                labels=["status"],
            )
            for delivery_status in DeliveryStatus:
                gauge.add_metric([delivery_status.value], deliveries.get(delivery_status.value, 0))
            yield gauge
        try:
            free = shutil.disk_usage(self.settings.node.data_dir).free
        except OSError:
            return
        yield GaugeMetricFamily(
            "dicomnode_free_disk_bytes",
            "Free bytes on the file system of node.data_dir",
            value=free,
        )


def metrics_text(settings: Settings, db: Database) -> tuple[bytes, str]:
    """The Prometheus exposition of every node process's metrics and the scrape-time gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    folder = metrics.multiprocess_dir()
    if folder is not None:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=str(folder))
    else:
        registry = REGISTRY  # counts of this process only
    collector = _ScrapeTimeCollector(settings, db)
    registry.register(collector)  # type: ignore[arg-type]
    try:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    finally:
        registry.unregister(collector)  # type: ignore[arg-type]


def build_app(settings: Settings, db: Database, state: NodeState) -> Starlette:
    """The ASGI application (sync endpoints run in Starlette's thread pool)."""
    templates = Environment(
        loader=PackageLoader("dicomnode.ops", "templates"),
        autoescape=select_autoescape(["html"]),
    )

    def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def readyz(_request: Request) -> Response:
        checks = readiness(settings, db, state)
        failing = [c.name for c in checks if not c.ok]
        body = {
            "ready": not failing,
            "failing": failing,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }
        return JSONResponse(body, status_code=503 if failing else 200)

    def metrics_endpoint(_request: Request) -> Response:
        data, content_type = metrics_text(settings, db)
        return Response(data, media_type=content_type)

    def status_page(_request: Request) -> Response:
        jobs, deliveries = overview.counts_by_status(db)
        page = templates.get_template("status.html").render(
            version=__version__,
            node=settings.node,
            pipeline=settings.worker.pipeline,
            checks=readiness(settings, db, state),
            jobs=jobs,
            deliveries=deliveries,
            studies=overview.recent_studies(db, settings),
            running=overview.running_jobs(db),
            failed=overview.failed_jobs(db),
            undelivered=overview.undelivered(db),
            models=overview.configured_models(settings),
            destinations=settings.destinations,
            show_phi=settings.node.log_phi,
            now=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        )
        return HTMLResponse(page)

    def result_file(request: Request) -> Response:
        try:
            study = validate_uid(request.path_params["study"])
            sop = validate_uid(request.path_params["sop"])
        except InvalidUIDError:
            return PlainTextResponse("not a UID\n", status_code=404)
        path = settings.results_dir / study / f"{sop}.dcm"
        if not path.is_file():
            return PlainTextResponse("no such result object\n", status_code=404)
        return FileResponse(path, media_type="application/dicom", filename=f"{sop}.dcm")

    def model_card(request: Request) -> Response:
        name = request.path_params["name"]
        card = overview.model_card(settings, name)
        if card is None:
            return PlainTextResponse("no such model card\n", status_code=404)
        page = templates.get_template("card.html").render(name=name, card=card)
        return HTMLResponse(page)

    return Starlette(
        routes=[
            Route("/", status_page),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/results/{study}/{sop}.dcm", result_file),
            Route("/models/{name}", model_card),
        ]
    )


class HTTPServer:
    """uvicorn serving :func:`build_app` in a background thread of this process."""

    def __init__(self, settings: Settings, db: Database, state: NodeState) -> None:
        import uvicorn

        self.settings = settings
        self.state = state
        config = uvicorn.Config(
            build_app(settings, db, state),
            log_config=None,  # the node's own logging (dicomnode.logs) applies
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10) -> None:
        """Bind ``[http] bind:port`` (a clear error when taken) and serve in a thread."""
        http = self.settings.http
        family = socket.AF_INET6 if ":" in http.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.bind, http.port))
        except OSError as exc:
            sock.close()
            raise DicomNodeError(
                f"cannot listen on {http.bind}:{http.port} (http.bind, http.port): {exc.strerror}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DicomNodeError(f"the HTTP server on {http.bind}:{http.port} did not start")
            time.sleep(0.02)
        log.info(
            "HTTP server on http://%s:%d (/healthz, /readyz, /metrics, /)", http.bind, http.port
        )

    def stop(self, timeout_s: float = 5) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
