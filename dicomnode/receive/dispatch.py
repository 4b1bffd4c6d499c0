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


class HandoffAssociationServer(ThreadedAssociationServer):
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

    def association_ended(self) -> None:
        """Count one finished association (called at the end of its thread)."""
        with self._ended_lock:
            self.channel.ended.value += 1
