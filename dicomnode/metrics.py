"""The node's Prometheus metrics, counted across all of its processes.

``serve`` calls :func:`prepare_multiprocess` before it starts any child process:
it points ``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/metrics`` (emptied, so
counts start at zero with each start) and the receiving and worker processes it
spawns inherit it. Each process then writes its counts to its own files there,
and the HTTP server's ``/metrics`` adds them up (``prometheus_client``'s
multiprocess mode). Without that directory (``dicomnode worker``, tests) the
counts stay in the process and cost next to nothing.

The counting code calls the one-line functions below; ``prometheus_client`` is
imported on the first count, after the environment is set, because it chooses
its storage when it is imported. The gauges that describe the database and the
disk (jobs and deliveries by status, free disk space) are read at scrape time by
:mod:`dicomnode.ops.http`, not counted here.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dicomnode.metrics")

#: The environment variable prometheus_client's multiprocess mode reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: C-STORE durations (seconds): a small radiograph to a large CT-size instance over a slow link.
_STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Job durations (seconds): the placeholder pipeline to a large CT on a CPU.
_JOB_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: One model call (seconds).
_INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: C-STORE statuses by name (PS3.4 B.2.3 and the node's own failure statuses).
_STATUS_NAMES = {0x0000: "success", 0xA700: "out_of_resources", 0xC000: "cannot_understand"}


def prepare_multiprocess(data_dir: Path) -> Path:
    """Empty ``<data_dir>/metrics`` and make this process and its children count there."""
    folder = data_dir / "metrics"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def multiprocess_dir() -> Path | None:
    """The directory the node's processes count in, or None (counts stay in this process)."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def status_label(status: int) -> str:
    """A C-STORE status as a label value: its name, or its code for the failure ranges."""
    if status in _STATUS_NAMES:
        return _STATUS_NAMES[status]
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot_understand"
    if 0xA900 <= status <= 0xA9FF:
        return "dataset_mismatch"
    return "failure"


@dataclass(frozen=True)
class _Metrics:
    instances_received: Any
    associations: Any
    store_seconds: Any
    job_seconds: Any
    jobs_finished: Any
    inference_seconds: Any
    delivery_attempts: Any


_lock = threading.Lock()
_made: _Metrics | None = None


def _metrics() -> _Metrics:
    """The metric objects, made once per process (threads may ask at the same time)."""
    global _made
    if _made is None:
        with _lock:
            if _made is None:
                _made = _make()
    return _made


def _make() -> _Metrics:
    from prometheus_client import Counter, Histogram

    return _Metrics(
        instances_received=Counter(
            "dicomnode_instances_received",
            "C-STORE requests answered, by the status they got",
            ["status"],
        ),
        associations=Counter(
            "dicomnode_associations",
            "Associations requested of the receiver, by outcome (accepted or rejected)",
            ["outcome"],
        ),
        store_seconds=Histogram(
            "dicomnode_cstore_duration_seconds",
            "Time the C-STORE handler took (store durably, index, answer)",
            buckets=_STORE_BUCKETS,
        ),
        job_seconds=Histogram(
            "dicomnode_job_duration_seconds",
            "Time one analysis job took, by pipeline",
            ["pipeline"],
            buckets=_JOB_BUCKETS,
        ),
        jobs_finished=Counter(
            "dicomnode_jobs_finished",
            "Analysis attempts that ended, by pipeline and outcome (done, skipped, error)",
            ["pipeline", "outcome"],
        ),
        inference_seconds=Histogram(
            "dicomnode_inference_seconds",
            "Time of one model call (a batch), by model",
            ["model"],
            buckets=_INFERENCE_BUCKETS,
        ),
        delivery_attempts=Counter(
            "dicomnode_delivery_attempts",
            "C-STORE attempts of result objects to destinations, by destination and outcome",
            ["destination", "outcome"],
        ),
    )


def instance_received(status: int, seconds: float) -> None:
    """Count one answered C-STORE and how long its handler took."""
    m = _metrics()
    m.instances_received.labels(status=status_label(status)).inc()
    m.store_seconds.observe(seconds)


def counted_store(handler: Callable[..., int]) -> Callable[..., int]:
    """Wrap an EVT_C_STORE handler so that each call is counted and timed.

    The metrics are made here, at the receiver's start, so that no association
    pays for importing prometheus_client.
    """
    _metrics()

    @functools.wraps(handler)
    def counted(*args: Any, **kwargs: Any) -> int:
        started = time.perf_counter()
        status = handler(*args, **kwargs)
        try:
            instance_received(int(status), time.perf_counter() - started)
        except Exception:  # counting must never change the answer to the peer
            log.warning("could not count a C-STORE", exc_info=True)
        return status

    return counted


def association_accepted(*_event: Any) -> None:
    """Count an accepted association (an EVT_ESTABLISHED handler).

    Not EVT_ACCEPTED: its handlers run before the association counts as established,
    while the receiver may already be serving the first C-STORE.
    """
    _metrics().associations.labels(outcome="accepted").inc()


def association_rejected(*_event: Any) -> None:
    """Count a rejected association (also usable as an EVT_REJECTED handler)."""
    _metrics().associations.labels(outcome="rejected").inc()


def job_finished(pipeline: str, outcome: str, seconds: float) -> None:
    """Count one analysis attempt that ended (``done``, ``skipped`` or ``error``)."""
    m = _metrics()
    m.job_seconds.labels(pipeline=pipeline).observe(seconds)
    m.jobs_finished.labels(pipeline=pipeline, outcome=outcome).inc()


@contextmanager
def inference(model: str) -> Iterator[None]:
    """Time one model call: ``with metrics.inference(name): model.predict(...)``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _metrics().inference_seconds.labels(model=model).observe(time.perf_counter() - started)


def delivery_attempt(destination: str, delivered: bool) -> None:
    """Count one C-STORE attempt of a result object."""
    outcome = "delivered" if delivered else "failed"
    _metrics().delivery_attempts.labels(destination=destination, outcome=outcome).inc()
