"""The stock receive path (``receive.fast_path = false``): pynetdicom's own code.

Associations are served by pynetdicom's association, DUL and DIMSE classes,
unchanged, with the node's ordinary C-STORE handler
(:func:`~dicomnode.receive.handlers.handle_store`: the same durable store and
index, Success only after fsync and the index). Only pynetdicom's public API is
used: the request handler's ``handle`` (socketserver's), the association as a
thread, and the ``EVT_CONN_OPEN`` / ``EVT_REQUESTED`` notification events.

What the node adds, as on the fast path: the PDU length limits and deadlines
(:class:`~dicomnode.receive.guard.GuardedSocket`, between pynetdicom and a
connection without TLS); a connection stops counting among its
peer's pending ones (:class:`~dicomnode.receive.dispatch.PendingConnectionLimit`)
once its A-ASSOCIATE-RQ has arrived or it has ended, and a receiving process fed
by a dispatcher counts its associations that ended. What the stock path does
not have is listed in docs/security.md ("fast_path = false").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.transport import RequestHandler

from dicomnode.receive.dispatch import HandoffAssociationServer
from dicomnode.receive.guard import GuardedSocket

#: The connection whose association the request handler's thread is starting:
#: ``EVT_CONN_OPEN`` runs in that thread, before the association starts.
_opening = threading.local()


def _opened(event: Event) -> None:
    """``EVT_CONN_OPEN``: give the new association its connection's pending release."""
    release: Callable[[], None] | None = getattr(_opening, "release", None)
    event.assoc.release_pending = release  # type: ignore[attr-defined]
    _opening.assoc = event.assoc


def _requested(event: Event) -> None:
    """``EVT_REQUESTED``: the A-ASSOCIATE-RQ is in; the connection is no longer pending."""
    release: Callable[[], None] | None = getattr(event.assoc, "release_pending", None)
    if release is not None:
        release()


#: The event handlers the stock path needs, for ``AE.make_server``.
EVENT_HANDLERS: list[tuple[Any, Callable[[Event], None]]] = [
    (evt.EVT_CONN_OPEN, _opened),
    (evt.EVT_REQUESTED, _requested),
]


class StockRequestHandler(RequestHandler):
    """pynetdicom's request handler, whose thread stays until the association ends.

    pynetdicom starts the association's thread and returns; this waits for it
    (socketserver's thread per connection, a daemon), then releases the
    connection's pending place and, on a server fed by a dispatcher, counts the
    association ended. A failure to start it is the server's ``handle_error``,
    which does both.
    """

    def handle(self) -> None:
        """Start the association as pynetdicom does, then wait for it to end."""
        server = self.server
        request = self.request
        release_pending = getattr(server, "release_pending", None)

        def release() -> None:
            if release_pending is not None:
                release_pending(request)

        if server.ssl_context is None:
            # pynetdicom reads the connection through the guard (limits, deadlines).
            ae = server.ae
            self.request = GuardedSocket(  # type: ignore[assignment]
                request,
                peer=str(self.client_address[0]),
                max_pdu_size=int(ae.maximum_pdu_size or 2**32 - 1),
                acse_timeout_s=float(ae.acse_timeout or 30),
                network_timeout_s=float(ae.network_timeout or 60),
                on_ended=release,
            )

        _opening.release = release
        _opening.assoc = None
        try:
            super().handle()
            assoc = _opening.assoc
        finally:
            _opening.release = None
            _opening.assoc = None
        if assoc is not None:
            assoc.join()
        release()
        if isinstance(server, HandoffAssociationServer):
            server.association_ended()
