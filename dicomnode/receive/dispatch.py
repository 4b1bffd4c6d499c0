"""Spreading associations over several receiving processes by their load.

With ``receive.processes`` above 1, the main process owns the listening socket.
:class:`AssociationDispatcher` accepts each TCP connection and passes the
connected socket (``SCM_RIGHTS`` over a Unix socket pair, one per receiving
process) to the process with the fewest associations in progress. That process
serves the whole association with pynetdicom, exactly as if it had accepted the
connection itself (:class:`HandoffAssociationServer`).

Letting every process bind the port with ``SO_REUSEPORT`` instead leaves the
choice to a hash of the peer's address and port: four associations landed on
four different processes in none of five tries here, and two or three of them
then shared one process and its GIL while other cores idled (see
``docs/receive.md``).

The load of a process is the number of connections handed to it minus the
number of associations it has finished; the process counts the latter in a
shared integer. A process that dies drops out of the choice until it is
restarted and attached again.
"""

from __future__ import annotations

import ctypes
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("dicomnode.receive")

#: The one byte sent with each handed-over socket (a message must carry data).
_HANDOFF = b"\x01"


@dataclass
class ReceiverChannel:
    """What one receiving process needs from the dispatcher (picklable for ``spawn``).

    ``socket`` is the process's end of its Unix socket pair: each message on it
    carries one connected TCP socket. ``ended`` counts the associations the
    process has finished; only that process writes it.
    """

    socket: socket.socket
    ended: Any  # a ctypes.c_longlong in shared memory (multiprocessing.Value, lock=False)

    def close(self) -> None:
        """Close this process's copy of the socket (the dispatcher's, once the child has one)."""
        self.socket.close()


@dataclass
class _Slot:
    """The dispatcher's view of one receiving process."""

    channel: socket.socket
    ended: Any
    handed: int = 0

    @property
    def in_progress(self) -> int:
        """Connections handed over that the process has not finished yet."""
        return self.handed - int(self.ended.value)


class AssociationDispatcher:
    """Accepts connections on the node's port; hands each to the least busy receiver."""

    def __init__(
        self, address: tuple[str, int], mp_context: SpawnContext, backlog: int = 64
    ) -> None:
        host, _port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # create_server sets SO_REUSEADDR, so connections of an earlier run still in
        # TIME_WAIT do not block the port; a live listener still does.
        self._listener = socket.create_server(address, family=family, backlog=backlog)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = tuple(self._listener.getsockname()[:2])  # type: ignore[assignment]
        """The address the dispatcher listens on (host, port)."""
        self._mp_context = mp_context
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def attach(self, index: int) -> ReceiverChannel:
        """A channel for receiving process ``index``; replaces that index's earlier one."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ended = self._mp_context.Value(ctypes.c_longlong, 0, lock=False)
        with self._lock:
            old = self._slots.pop(index, None)
            self._slots[index] = _Slot(channel=mine, ended=ended)
        if old is not None:
            old.channel.close()
        return ReceiverChannel(socket=theirs, ended=ended)

    def in_progress(self) -> dict[int, int]:
        """Associations in progress per receiving process, as the dispatcher counts them."""
        with self._lock:
            return {index: slot.in_progress for index, slot in self._slots.items()}

    def start(self) -> None:
        """Start accepting connections in a background thread."""
        self._thread = threading.Thread(target=self._run, name="dicomnode-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting (the port closes); receivers keep the associations they have."""
        if self._thread is not None:
            self._wake_w.send(b"\0")
            self._thread.join()
            self._thread = None
        self._listener.close()
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            slot.channel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _events in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept_pending()

    def _accept_pending(self) -> None:
        """Accept every connection waiting in the backlog and hand each over."""
        while True:
            try:
                connection, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors, for example: the connection stays in the
                # backlog; try again shortly instead of spinning.
                log.error("cannot accept a connection: %s", exc)
                time.sleep(0.1)
                return
            try:
                self.hand_over(connection)
            finally:
                connection.close()

    def hand_over(self, connection: socket.socket) -> int | None:
        """Pass ``connection`` to the least busy receiving process; return its index.

        Ties go to the process that has had the fewest connections so far. A
        process whose channel is broken (it died) is dropped until it is attached
        again. None when no process could take it: the caller closes the
        connection and the peer sees it refused.
        """
        with self._lock:
            ranked = sorted(
                self._slots.items(), key=lambda item: (item[1].in_progress, item[1].handed)
            )
            for index, slot in ranked:
                try:
                    socket.send_fds(slot.channel, [_HANDOFF], [connection.fileno()])
                except OSError as exc:
                    log.warning("receiving process %d cannot take associations: %s", index, exc)
                    del self._slots[index]
                    slot.channel.close()
                    continue
                slot.handed += 1
                return index
        log.error("no receiving process is running: connection closed unanswered")
        return None


#: Seconds between two log lines about one address's refused connections.
_REFUSAL_LOG_INTERVAL_S = 10.0


class PendingConnectionLimit:
    """Association server mixin: few connections per peer address before association.

    A connection is *pending* from its acceptance until its A-ASSOCIATE-RQ has
    arrived (the association calls :meth:`release_pending`) or it ends. A peer
    address with ``max_pending_per_peer`` pending connections has further ones
    closed at once, before a thread is started for them (socketserver's
    ``verify_request``). Pending connections hold no association slot (the
    node's AE counts acceptors only once their request is in), so a flood of
    bare or trickling connections from some addresses does not lock out the
    others.
    """

    def __init__(self, *args: Any, max_pending_per_peer: int = 8, **kwargs: Any) -> None:
        self.max_pending_per_peer = max_pending_per_peer
        self._pending_lock = threading.Lock()
        self._pending: dict[object, str] = {}
        self._pending_per_peer: dict[str, int] = {}
        self._refusals: dict[str, tuple[float, int]] = {}
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit ``request`` unless its address has too many pending connections."""
        host = str(client_address[0] if isinstance(client_address, tuple) else client_address)
        now = time.monotonic()
        with self._pending_lock:
            count = self._pending_per_peer.get(host, 0)
            if count < self.max_pending_per_peer:
                self._pending_per_peer[host] = count + 1
                self._pending[request] = host
                return True
            logged_at, refused = self._refusals.get(host, (0.0, 0))
            refused += 1
            if now - logged_at < _REFUSAL_LOG_INTERVAL_S:
                self._refusals[host] = (logged_at, refused)
                return False
            self._refusals[host] = (now, 0)
        log.warning(
            "closed %d connection(s) from %s: %d connections from that address have not "
            "sent their association request yet (receive.max_pending_per_peer)",
            refused,
            host,
            count,
        )
        return False

    def release_pending(self, request: object) -> None:
        """``request`` is no longer pending (its request arrived, or it ended); idempotent."""
        with self._pending_lock:
            host = self._pending.pop(request, None)
            if host is None:
                return
            count = self._pending_per_peer.get(host, 0) - 1
            if count > 0:
                self._pending_per_peer[host] = count
            else:
                self._pending_per_peer.pop(host, None)

    def pending_connections(self) -> dict[str, int]:
        """Pending connections per peer address."""
        with self._pending_lock:
            return dict(self._pending_per_peer)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection whose association never started is no longer pending."""
        self.release_pending(request)
        super().handle_error(request, client_address)  # type: ignore[misc]


class HandoffAssociationServer(PendingConnectionLimit, ThreadedAssociationServer):
    """A pynetdicom association server fed by a dispatcher instead of ``accept``.

    Its "listening socket" is the receiving process's end of the channel: it is
    readable when the dispatcher has passed a connection, and ``get_request``
    takes that connection. Everything after that is pynetdicom's server.
    """

    daemon_threads = True

    def __init__(
        self,
        *args: Any,
        channel: ReceiverChannel,
        on_channel_closed: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        self.channel = channel
        self._on_channel_closed = on_channel_closed
        self._ended_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Use the channel instead of binding a TCP socket."""
        self.socket.close()  # type: ignore[union-attr]
        self.socket = self.channel.socket
        self.server_address = ("", 0)

    def server_activate(self) -> None:
        """Nothing to listen on: the dispatcher listens."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """The next connection the dispatcher passed (wrapped in TLS when configured)."""
        message, fds, _flags, _address = socket.recv_fds(self.socket, len(_HANDOFF), 1)  # type: ignore[arg-type]
        if not fds:
            if message:
                raise OSError(f"dispatcher message without a connection: {message!r}")
            # The dispatcher's end is closed: the main process stopped or died.
            self._on_channel_closed()
            time.sleep(0.1)  # the listening loop is being shut down; do not spin
            raise OSError("the dispatcher closed the channel")
        connection = socket.socket(fileno=fds[0])
        try:
            address = connection.getpeername()[:2]
            if self.ssl_context:
                connection = self.ssl_context.wrap_socket(connection, server_side=True)
        except OSError:
            # The peer left, or its TLS handshake failed: no association will start,
            # so none will end (socketserver logs nothing, as with pynetdicom's accept).
            connection.close()
            self.association_ended()
            raise
        return connection, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection whose association thread never started counts as ended."""
        super().handle_error(request, client_address)
        self.association_ended()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """:class:`PendingConnectionLimit`'s check; a refused connection counts as ended."""
        if super().verify_request(request, client_address):
            return True
        self.association_ended()
        return False

    def association_ended(self) -> None:
        """Count one finished association (called at the end of its thread)."""
        with self._ended_lock:
            self.channel.ended.value += 1
