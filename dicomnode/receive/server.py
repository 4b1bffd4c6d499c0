"""The receiving Application Entity: contexts, limits, and a graceful stop.

With one receiving process the :class:`Receiver` listens on the node's port
itself. With several (``receive.processes``), the main process listens and an
:class:`~dicomnode.receive.dispatch.AssociationDispatcher` hands each
connection to the least busy receiving process, whose :class:`Receiver` takes
connections from its channel; several processes sidestep the GIL.

Each association is served by the fast path (:mod:`dicomnode.receive.fastpath`,
``receive.fast_path = true``) or by pynetdicom's stock code
(:mod:`dicomnode.receive.stock`); the fast path falls back to the stock one
when the installed pynetdicom is not a tested version.
"""

from __future__ import annotations

import logging
import math
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import metrics
from dicomnode.config import Settings, TLSSettings
from dicomnode.db import Database
from dicomnode.receive import fastpath, stock
from dicomnode.receive.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from dicomnode.receive.dispatch import (
    HandoffAssociationServer,
    PendingConnectionLimit,
    ReceiverChannel,
)
from dicomnode.receive.handlers import (
    ReceiveContext,
    handle_echo,
    handle_requested,
    handle_store,
)
from dicomnode.storage import InstanceStore

log = logging.getLogger("dicomnode.receive")


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings the receiver relies on."""
    # Received datasets go straight to a file: memory stays flat and nothing is re-encoded.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's standard handlers log every PDU and identifier; they cost time and
    # could put patient data in the logs.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Server-side TLS context: TLS 1.2 or newer, client certificates when a CA is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=tls.certificate, keyfile=tls.private_key)
    if tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=tls.ca_certificates)
    return context


def build_ae(settings: Settings, processes: int = 1) -> AE:
    """The node's AE with every supported context and the configured limits.

    ``maximum_associations`` is per process, so the configured total is divided
    among ``processes``. The dispatcher always picks the least busy process, so
    one refuses an association only when all are at their share.
    """
    receive = settings.receive
    ae = _NodeAE(ae_title=settings.node.ae_title)
    ae.maximum_associations = max(1, math.ceil(receive.max_associations / processes))
    ae.maximum_pdu_size = receive.max_pdu_size
    ae.network_timeout = receive.network_timeout_s
    ae.acse_timeout = receive.acse_timeout_s
    ae.dimse_timeout = receive.dimse_timeout_s
    ae.add_supported_context(Verification)
    sop_classes = list(STORAGE_SOP_CLASSES.values())
    if receive.accept_other_storage:
        # Modalities send dose reports, presentation states, etc. with a study; refusing
        # them makes many senders mark the whole transfer failed. Keep them, index them.
        sop_classes += [
            cx.abstract_syntax  # type: ignore[misc]
            for cx in AllStoragePresentationContexts
            if cx.abstract_syntax not in sop_classes
        ]
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


class _NodeAE(AE):
    """pynetdicom's AE, whose association limit counts only requested associations.

    pynetdicom compares ``active_associations`` with ``maximum_associations``
    when it negotiates a new association; it counts every acceptor thread, so
    connections that never sent an A-ASSOCIATE-RQ (port scans, bare connects,
    tricklers) would take the slots of real callers. Here an acceptor counts
    once its request has arrived. Those before that are limited per peer
    address instead (:class:`~dicomnode.receive.dispatch.PendingConnectionLimit`)
    and in time (``acse_timeout_s``).
    """

    @property
    def active_associations(self) -> list[Any]:
        """Requestors, and acceptors whose A-ASSOCIATE-RQ has arrived."""
        return [
            assoc
            for assoc in super().active_associations
            if not assoc.is_acceptor or assoc.requestor.primitive is not None
        ]


class Receiver:
    """The receiving AE of this process.

    Without ``channel`` it listens on the node's port. With one, it serves the
    connections a dispatcher passes over it, and calls ``on_channel_closed`` if
    the dispatcher goes away.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: InstanceStore,
        processes: int,
        channel: ReceiverChannel | None = None,
        on_channel_closed: Callable[[], None] | None = None,
    ):
        configure_pynetdicom()
        # pynetdicom creates its chunked temporary files in tempfile's directory:
        # put them next to the storage root so the final rename is atomic.
        store.prepare()
        tempfile.tempdir = str(store.host_incoming)
        self.settings = settings
        self.ae = build_ae(settings, processes)
        self.ctx = ReceiveContext(settings=settings, db=db, store=store)
        self.processes = processes
        self.channel = channel
        self.on_channel_closed = on_channel_closed
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.fast_path = False

    def start(self) -> None:
        """Bind and start accepting associations in a background thread."""
        handlers = [
            (
                evt.EVT_REQUESTED,
                handle_requested,
                [self.settings.receive, self.settings.node.ae_title],
            ),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, metrics.counted_store(handle_store), [self.ctx]),
            (evt.EVT_ESTABLISHED, metrics.association_accepted),
            (evt.EVT_REJECTED, metrics.association_rejected),
        ]
        request_handler = fastpath.request_handler(self.settings.receive.fast_path)
        if request_handler is None:
            request_handler = stock.StockRequestHandler
            handlers += stock.EVENT_HANDLERS
            if not self.settings.receive.fast_path:
                log.info("receive.fast_path is false: associations use pynetdicom's stock code")
        #: Whether associations are served by the fast path (False: pynetdicom's stock code).
        self.fast_path = request_handler is not stock.StockRequestHandler
        address = (self.settings.node.bind, self.settings.node.port)
        tls = self.settings.receive.tls
        ssl_context = build_ssl_context(tls) if tls else None
        # Without a channel the server listens on the port; with one it takes the
        # connections a dispatcher passes over it.
        serving: dict[str, Any] = (
            {"server_class": _PlainAssociationServer}
            if self.channel is None
            else {
                "server_class": HandoffAssociationServer,
                "channel": self.channel,
                "on_channel_closed": self.on_channel_closed or (lambda: None),
            }
        )
        # Per process, like max_associations: an equal share, rounded up.
        serving["max_pending_per_peer"] = max(
            1, math.ceil(self.settings.receive.max_pending_per_peer / self.processes)
        )
        self._server = self.ae.make_server(
            address,
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=ssl_context,
            request_handler=request_handler,
            **serving,
        )
        self.ae._servers.append(self._server)  # type: ignore[arg-type]
        self._thread = threading.Thread(
            target=self._server.serve_forever,  # type: ignore[union-attr]
            name="dicomnode-acceptor",
            daemon=True,
        )
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight associations finish (up to ``grace_s``), then abort."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # shutdown() only closes the listening socket; association threads run on.
        server.shutdown()
        deadline = time.monotonic() + grace_s
        # Only established associations carry data worth waiting for; a connection that
        # never sent an A-ASSOCIATE-RQ (a port probe) is simply closed.
        while (
            any(a.is_established for a in server.active_associations)
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        left = server.active_associations
        for assoc in left:
            assoc.abort()
        established = [a for a in left if a.is_established]
        if established:
            log.warning(
                "aborted %d association(s) still open after %.0f s", len(established), grace_s
            )


class _PlainAssociationServer(PendingConnectionLimit, ThreadedAssociationServer):
    """The usual threaded server, with daemon association threads and a limit on
    pending connections per peer address."""

    daemon_threads = True
