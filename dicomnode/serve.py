"""``dicomnode serve`` and ``dicomnode worker``: the process wiring of the node.

``serve``: the main process migrates the database, cleans up after a crash and
runs the completion check (which queues an analysis for each complete study).
It receives itself when ``receive.processes = 1``; otherwise it listens on the
port and hands each connection to the least busy of that many receiver
processes (:mod:`dicomnode.receive.dispatch`). It also supervises ``worker.processes``
worker processes of ``worker.threads`` workers each. SIGTERM or SIGINT stops
accepting associations, lets those in flight finish (up to
``receive.shutdown_grace_s``), lets running jobs finish or hands them back, and
exits 0.

The main process also runs the outbox sender (C-STORE of result objects to every
``[[destinations]]`` entry).

``worker``: workers alone, for more hosts sharing one PostgreSQL database and
one storage.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from dicomnode import metrics
from dicomnode.completion import CompletionScheduler
from dicomnode.config import Settings
from dicomnode.db import Database, Study, utcnow
from dicomnode.errors import DicomNodeError
from dicomnode.logs import configure_logging
from dicomnode.pipelines import load_pipeline
from dicomnode.queue import enqueue
from dicomnode.receive.dispatch import AssociationDispatcher, ReceiverChannel
from dicomnode.receive.server import Receiver
from dicomnode.retention import Retention, RetentionThread
from dicomnode.send import Sender
from dicomnode.storage import InstanceStore
from dicomnode.worker import Worker

if TYPE_CHECKING:
    from dicomnode.ops.http import HTTPServer

log = logging.getLogger("dicomnode.serve")

#: Makes, at each (re)start of a child, what its entry point gets besides the settings,
#: its index and its ready event, and what to call once the child has started (to
#: close the parent's copies of what it passed), or None.
_ExtraArgs = Callable[[], tuple[tuple[Any, ...], Callable[[], None] | None]]


def _no_extra_args() -> tuple[tuple[Any, ...], None]:
    return (), None


#: prctl option: the signal a child gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1

#: A child process that dies this soon after starting counts as a failed start.
_FAST_FAILURE_S = 5.0
_MAX_FAST_FAILURES = 3


def make_store(settings: Settings) -> InstanceStore:
    """The instance store described by the settings."""
    return InstanceStore(
        settings.instances_dir, settings.incoming_dir, settings.storage.min_free_mb * 2**20
    )


def make_results_store(settings: Settings) -> InstanceStore:
    """Where the node's own result objects are written before they are sent."""
    return InstanceStore(settings.results_dir, settings.incoming_dir, 0)


def _install_stop_signals(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _stop_at_once_on_signals() -> None:
    """SIGTERM and SIGINT end this process at once (the kernel's default action).

    For a child while it starts (a worker loading its models takes many
    seconds, part of them in C code where a Python handler cannot run): it has
    nothing to hand back yet, and a supervisor that stops or dies must not have
    to wait for it. :func:`_install_stop_signals` takes over once it is ready.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def _stop_with_parent(grace_s: float) -> None:
    """Stop this child when the process that started it dies.

    A main process killed with SIGKILL (or by the OOM killer) then leaves no
    receivers or workers behind. On Linux the kernel sends SIGTERM at once
    (``PR_SET_PDEATHSIG``). Everywhere, a daemon thread also watches the parent:
    once it is gone, the child gets SIGTERM, and if it still runs ``grace_s``
    (+5) seconds later (something replaced its handler, or a job does not end)
    it exits without further clean-up.
    """
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.debug("no parent-death signal on this platform; the parent watch remains")
    threading.Thread(
        target=_watch_parent, args=(parent_pid, grace_s), name="parent-watch", daemon=True
    ).start()


#: How often a child looks whether its parent is still there.
_PARENT_WATCH_S = 0.5


def _watch_parent(parent_pid: int | None, grace_s: float) -> None:
    """Wait until the parent process is gone; then SIGTERM self, and later exit."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_WATCH_S)
    log.warning("the supervising process %s is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s + 5)
    log.error("still running %.0f s after the supervising process died: exiting", grace_s + 5)
    logging.shutdown()
    os._exit(1)


def _channel_for(dispatcher: AssociationDispatcher, index: int) -> _ExtraArgs:
    """Extra arguments of receiver ``index``: a fresh channel from the dispatcher.

    Once the child has its end, the main process closes its own copy of it, so
    that the dispatcher sees a broken channel as soon as the child dies.
    """

    def make() -> tuple[tuple[Any, ...], Callable[[], None]]:
        channel = dispatcher.attach(index)
        return (channel,), channel.close

    return make


def _receiver_main(settings: Settings, index: int, ready: Any, channel: ReceiverChannel) -> None:
    """Entry point of one receiver process; sets ``ready`` once it takes connections.

    It stops on SIGTERM or SIGINT, or when the main process closes its channel.
    """
    configure_logging(settings.node.log_level)
    stop = threading.Event()
    _stop_at_once_on_signals()
    _stop_with_parent(settings.receive.shutdown_grace_s)
    db = Database(settings.database.url)
    receiver = Receiver(
        settings,
        db,
        make_store(settings),
        settings.receive.processes,
        channel=channel,
        on_channel_closed=stop.set,
    )
    receiver.start()
    _install_stop_signals(stop)
    ready.set()
    log.info("receiver %d accepting associations", index)
    stop.wait()
    receiver.stop(settings.receive.shutdown_grace_s)
    db.dispose()


def run_workers(
    settings: Settings,
    stop: threading.Event,
    ready: Any = None,
    on_loaded: Callable[[], None] | None = None,
) -> int:
    """Load the pipeline once, run ``worker.threads`` workers until ``stop``; return jobs done.

    ``on_loaded`` runs once the models are loaded, before any job is claimed (a
    worker process installs its graceful stop there).
    """
    db = Database(settings.database.url)
    pipeline = load_pipeline(settings.worker.pipeline, settings)
    pipeline.load()
    if on_loaded is not None:
        on_loaded()
    if stop.is_set():
        db.dispose()
        return 0
    results = make_results_store(settings)
    results.prepare()
    instances = make_store(settings)
    workers = [
        Worker(settings, db, pipeline, results, instances, name=f"w{i}")
        for i in range(settings.worker.threads)
    ]
    threads = [
        threading.Thread(target=w.run, args=(stop,), name=f"worker-{i}")
        for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    if ready is not None:
        ready.set()
    for thread in threads:
        thread.join()
    db.dispose()
    return sum(w.jobs_done for w in workers)


def _worker_main(settings: Settings, index: int, ready: Any) -> None:
    """Entry point of one worker process."""
    configure_logging(settings.node.log_level)
    stop = threading.Event()
    # Until its models are loaded a SIGTERM ends the worker at once; after that it
    # finishes or hands back its job first.
    _stop_at_once_on_signals()
    _stop_with_parent(settings.receive.shutdown_grace_s)
    run_workers(settings, stop, ready, on_loaded=lambda: _install_stop_signals(stop))


class _StoppedDuringStartError(Exception):
    """SIGTERM or SIGINT arrived while a child was starting: stop instead of waiting."""


class _Supervisor:
    """Keeps child processes (receivers, workers) running; restarts those that die."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop_requested = stop or threading.Event()
        self.ctx = multiprocessing.get_context("spawn")
        self.children: dict[str, tuple[BaseProcess, float, Callable[..., None], _ExtraArgs]] = {}
        self.fast_failures = 0

    def start(
        self,
        name: str,
        target: Callable[..., None],
        extra_args: _ExtraArgs = _no_extra_args,
        timeout_s: float = 120,
    ) -> None:
        """Start child ``name`` running ``target`` and wait until it says it is ready.

        ``target`` gets the settings, the child's index, its ready event, and the
        arguments ``extra_args()`` makes (called again at each restart).
        """
        ready = self.ctx.Event()
        index = int(name.rsplit("-", 1)[1])
        extra, after_start = extra_args()
        proc = self.ctx.Process(
            target=target, args=(self.settings, index, ready, *extra), name=name, daemon=False
        )
        proc.start()
        # The child has its own copies of any descriptors passed to it now.
        if after_start is not None:
            after_start()
        self.children[name] = (proc, time.monotonic(), target, extra_args)
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if self.stop_requested.is_set():
                raise _StoppedDuringStartError(name)
            if not proc.is_alive() or time.monotonic() > deadline:
                raise DicomNodeError(f"{name} failed to start (exit code {proc.exitcode})")

    def check(self) -> None:
        """Restart children that died; give up after repeated failed starts."""
        for name, (proc, started, target, extra_args) in list(self.children.items()):
            if proc.is_alive():
                continue
            log.error("%s exited with code %s; restarting it", name, proc.exitcode)
            if time.monotonic() - started < _FAST_FAILURE_S:
                self.fast_failures += 1
                if self.fast_failures >= _MAX_FAST_FAILURES:
                    raise DicomNodeError("child processes keep failing at start; see the log")
            self.start(name, target, extra_args)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every child, wait up to ``grace_s`` (+5 s), then kill what is left."""
        for proc, *_ in self.children.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace_s + 5
        for proc, *_ in self.children.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("%s did not stop in time; killing it", proc.name)
                proc.kill()
                proc.join()


def _enqueue_hook(settings: Settings) -> Callable[[Session, Study], None]:
    def on_complete(session: Session, study: Study) -> None:
        enqueue(session, study, settings.queue, utcnow())

    return on_complete


def _start_http(settings: Settings, db: Database, supervisor: _Supervisor) -> HTTPServer | None:
    """Start the ``[http]`` server (health, metrics, status page) if configured; else None."""
    if not settings.http.enabled:
        return None
    from dicomnode.ops.http import HTTPServer, NodeState

    state = NodeState(
        dead_children=lambda: [
            name for name, (proc, *_) in supervisor.children.items() if not proc.is_alive()
        ]
    )
    server = HTTPServer(settings, db, state)
    server.start()
    return server


def serve(settings: Settings) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT; return the exit code."""
    configure_logging(settings.node.log_level)
    node = settings.node
    from dicomnode.ops import preflight

    preflight.check(settings)  # models, TLS files, data dir: ConfigError (exit 2) before receiving
    stop = threading.Event()
    _install_stop_signals(stop)

    db = Database(settings.database.url)
    db.migrate()
    store = make_store(settings)
    store.prepare()
    make_results_store(settings).prepare()
    removed = store.clean_incoming()
    if removed:
        log.warning("removed %d partial file(s) left by an earlier stop", removed)
    _check_port_free(node.bind, node.port)
    metrics.prepare_multiprocess(node.data_dir)  # before any child starts: they inherit it

    completion = CompletionScheduler(
        db, settings.completion.check_interval_s, on_complete=_enqueue_hook(settings)
    )
    sender_stop = threading.Event()
    sender = threading.Thread(
        target=Sender(settings, db, make_results_store(settings)).run,
        args=(sender_stop,),
        name="sender",
        daemon=True,
    )
    processes = settings.receive.processes
    receiver: Receiver | None = None
    dispatcher: AssociationDispatcher | None = None
    supervisor = _Supervisor(settings, stop)
    http = _start_http(settings, db, supervisor)
    retention = RetentionThread(Retention(settings, db))
    try:
        if processes == 1:
            receiver = Receiver(settings, db, store, 1)
            receiver.start()
        else:
            dispatcher = AssociationDispatcher(
                (node.bind, node.port),
                supervisor.ctx,
                backlog=max(64, settings.receive.max_associations),
            )
            for index in range(processes):
                supervisor.start(
                    f"receiver-{index}", _receiver_main, _channel_for(dispatcher, index)
                )
            dispatcher.start()
        if http is not None:
            http.state.receiving.set()
        for index in range(settings.worker.processes):
            supervisor.start(f"worker-{index}", _worker_main)
        if http is not None:
            http.state.models_loaded.set()
        completion.start()
        if settings.retention.enabled:
            retention.start()
        if settings.destinations:
            sender.start()
        log.info(
            "dicomnode %s listening on %s:%d (%d receiving process%s, %d worker process%s), "
            "data in %s",
            node.ae_title,
            node.bind,
            node.port,
            processes,
            "" if processes == 1 else "es",
            settings.worker.processes,
            "" if settings.worker.processes == 1 else "es",
            node.data_dir,
        )
        while not stop.wait(0.5):
            supervisor.check()
    except _StoppedDuringStartError as exc:
        log.info("stopping while %s was starting", exc)
    finally:
        grace = settings.receive.shutdown_grace_s
        if receiver is not None:
            receiver.stop(grace)
        if dispatcher is not None:
            dispatcher.stop()
        supervisor.stop(grace)
        if http is not None:
            http.stop()
        completion.stop()
        retention.stop()
        sender_stop.set()
        if sender.is_alive():
            sender.join(grace)
        db.dispose()
    log.info("dicomnode stopped")
    return 0


def work(settings: Settings) -> int:
    """``dicomnode worker``: run workers in the foreground until SIGTERM or SIGINT."""
    configure_logging(settings.node.log_level)
    stop = threading.Event()
    _install_stop_signals(stop)
    Database(settings.database.url).migrate()
    log.info(
        "dicomnode worker: %d thread(s), pipeline %s",
        settings.worker.threads,
        settings.worker.pipeline,
    )
    done = run_workers(settings, stop)
    log.info("dicomnode worker stopped after %d job(s)", done)
    return 0
