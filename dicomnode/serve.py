"""``dicomnode serve``: the process wiring of the node.

The main process migrates the database, cleans up after a crash, runs the
completion check, and either receives itself (``receive.processes = 1``) or
supervises that many receiver processes sharing the port. SIGTERM or SIGINT
stops accepting associations, lets those in flight finish (up to
``receive.shutdown_grace_s``) and exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from dicomnode.completion import CompletionScheduler
from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.errors import DicomNodeError
from dicomnode.logs import configure_logging
from dicomnode.receive.server import Receiver
from dicomnode.storage import InstanceStore

log = logging.getLogger("dicomnode.serve")

#: A receiver process that dies this soon after starting counts as a failed start.
_FAST_FAILURE_S = 5.0
_MAX_FAST_FAILURES = 3


def make_store(settings: Settings) -> InstanceStore:
    """The instance store described by the settings."""
    return InstanceStore(
        settings.instances_dir, settings.incoming_dir, settings.storage.min_free_mb * 2**20
    )


def _install_stop_signals(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _check_port_free(host: str, port: int) -> None:
    """Fail early and clearly when something already listens on the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: connections of an earlier run in TIME_WAIT must not count as "in use";
    # a live listener still makes bind() fail.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise DicomNodeError(
            f"cannot listen on {host}:{port} (node.bind, node.port): {exc.strerror}"
        ) from None
    finally:
        probe.close()


def _receiver_main(settings: Settings, index: int, ready: Any) -> None:
    """Entry point of one receiver process; sets ``ready`` once its socket listens."""
    configure_logging(settings.node.log_level)
    stop = threading.Event()
    _install_stop_signals(stop)
    db = Database(settings.database.url)
    receiver = Receiver(settings, db, make_store(settings), settings.receive.processes)
    receiver.start()
    ready.set()
    log.info("receiver %d accepting associations", index)
    stop.wait()
    receiver.stop(settings.receive.shutdown_grace_s)
    db.dispose()


class _Supervisor:
    """Keeps ``receive.processes`` receiver processes running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.children: dict[int, tuple[BaseProcess, float]] = {}
        self.fast_failures = 0

    def start(self, index: int, timeout_s: float = 60) -> None:
        """Start receiver ``index`` and wait until it listens."""
        ready = self.ctx.Event()
        proc = self.ctx.Process(
            target=_receiver_main,
            args=(self.settings, index, ready),
            name=f"receiver-{index}",
            daemon=False,
        )
        proc.start()
        self.children[index] = (proc, time.monotonic())
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise DicomNodeError(
                    f"receiver process {index} failed to start (exit code {proc.exitcode})"
                )

    def check(self) -> None:
        """Restart children that died; give up after repeated failed starts."""
        for index, (proc, started) in list(self.children.items()):
            if proc.is_alive():
                continue
            log.error("receiver %d exited with code %s; restarting", index, proc.exitcode)
            if time.monotonic() - started < _FAST_FAILURE_S:
                self.fast_failures += 1
                if self.fast_failures >= _MAX_FAST_FAILURES:
                    raise DicomNodeError("receiver processes keep failing at start; see the log")
            self.start(index)

    def stop(self, grace_s: float) -> None:
        for proc, _ in self.children.values():
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: graceful stop in the child
        deadline = time.monotonic() + grace_s + 5
        for proc, _ in self.children.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("receiver %s did not stop in time; killing it", proc.name)
                proc.kill()
                proc.join()


def serve(settings: Settings) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT; return the exit code."""
    configure_logging(settings.node.log_level)
    node = settings.node
    stop = threading.Event()
    _install_stop_signals(stop)

    db = Database(settings.database.url)
    db.migrate()
    store = make_store(settings)
    store.prepare()
    removed = store.clean_incoming()
    if removed:
        log.warning("removed %d partial file(s) left by an earlier stop", removed)
    _check_port_free(node.bind, node.port)

    completion = CompletionScheduler(db, settings.completion.check_interval_s)
    processes = settings.receive.processes
    receiver: Receiver | None = None
    supervisor: _Supervisor | None = None
    try:
        if processes == 1:
            receiver = Receiver(settings, db, store, 1)
            receiver.start()
        else:
            supervisor = _Supervisor(settings)
            for index in range(processes):
                supervisor.start(index)
        completion.start()
        log.info(
            "dicomnode %s listening on %s:%d (%d receiving process%s), data in %s",
            node.ae_title,
            node.bind,
            node.port,
            processes,
            "" if processes == 1 else "es",
            node.data_dir,
        )
        while not stop.wait(0.5):
            if supervisor is not None:
                supervisor.check()
    finally:
        grace = settings.receive.shutdown_grace_s
        if receiver is not None:
            receiver.stop(grace)
        if supervisor is not None:
            supervisor.stop(grace)
        completion.stop()
        db.dispose()
    log.info("dicomnode stopped")
    return 0
