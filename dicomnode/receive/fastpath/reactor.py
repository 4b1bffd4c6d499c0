"""Faster association threads for the receiver.

pynetdicom's acceptor loop sleeps 1 ms before every look at its DIMSE message
queue, and its DUL thread sleeps 1 ms whenever it finds nothing to do. With one
instance per C-STORE that adds up to several milliseconds per instance on a
single association, which dominates the receive rate of CT-size instances; a
shorter sleep only trades the latency for a busy loop that competes with the
C-STORE handler for the GIL.

Nothing here polls:

* :class:`EventDrivenAssociation` waits on its DIMSE message queue (it wakes up
  the moment a C-STORE request is complete).
* :class:`EventDrivenDUL` blocks in ``select`` on the association's socket and a
  wake-up socket that :meth:`EventDrivenDUL.send_pdu` and
  :meth:`EventDrivenDUL.kill_dul` write to, so it wakes for incoming data or for
  a primitive to send (a C-STORE response) and sleeps otherwise.
* :class:`BulkReadSocket` reads each PDU with a few large ``recv_into`` calls
  instead of pynetdicom's loop of 4 KiB reads (2,500 Python iterations for one
  10 MB radiograph).
* A C-STORE request arrives as P-DATA-TF PDUs: its command set, then the data
  set in fragments (a 10 MB radiograph in 64 KiB PDUs is 160 of them). In data
  transfer, :meth:`EventDrivenDUL._take_p_data` decodes the command
  (:func:`~dicomnode.receive.fastpath.cstore.decode_c_store_rq`) and stages the file meta
  header; :meth:`EventDrivenDUL._receive_fragments` then reads each fragment
  from the socket straight into the data set's staging buffer
  (:class:`~dicomnode.receive.fastpath.cstore.IncomingDataSet` writes it out in chunks,
  with direct I/O after the first). When
  the data set is complete and the association thread is idle, the DUL thread
  serves the request itself (pynetdicom's Storage SCP and our handler);
  otherwise it queues it for the association thread, exactly where pynetdicom's
  DIMSE layer would have put it (:class:`MessageQueue` keeps messages in order).
  This skips PDU objects, the state machine and pydicom, which cost about 0.1 ms
  per PDU and 0.6 ms per command, and two thread hand-offs per instance.
  Every other message (C-ECHO, a command in several fragments, anything
  unexpected) goes to pynetdicom's DIMSE layer in order.
* :class:`FastStoreResponseDIMSE` encodes the C-STORE response's command set
  directly (:func:`~dicomnode.receive.fastpath.cstore.encode_c_store_rsp`) instead of
  through a pydicom ``Dataset`` (0.4 ms per instance); anything else is sent by
  pynetdicom.

Everything else is pynetdicom's own machinery (state machine, DIMSE, ACSE).
The request handler below makes the association server build these instead of
the defaults.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

from dicomnode.receive.dispatch import HandoffAssociationServer
from dicomnode.receive.fastpath.cstore import (
    IncomingDataSet,
    StagingBuffers,
    decode_c_store_rq,
    encode_c_store_rsp,
)
from dicomnode.receive.guard import (
    A_ASSOCIATE_RQ as _A_ASSOCIATE_RQ,
)
from dicomnode.receive.guard import (
    ABORT_SOURCE_PROVIDER as _ABORT_SOURCE_PROVIDER,
)
from dicomnode.receive.guard import (
    ABORT_UNEXPECTED_PARAMETER,
    COMMAND_SET_LIMIT,
    PDU_TOO_SLOW,
    REQUEST_TOO_SLOW,
    PeerLimitError,
    check_pdu_length,
    pdu_limit,
)
from dicomnode.receive.guard import (
    P_DATA_TF as _P_DATA_TF,
)
from dicomnode.receive.guard import (
    PDU_TYPES as _PDU_TYPES,
)

log = logging.getLogger("dicomnode.receive")

#: How long the reactor blocks on the message queue before it checks for a
#: release, an abort or a network timeout. A message wakes it at once.
_QUEUE_WAIT_S = 0.005
#: Bytes asked of the kernel per read (a few 64 KiB PDUs at a time).
_READ_AHEAD = 256 * 1024
#: Longest the DUL sleeps in ``select`` without a wake-up, to look at its ARTIM
#: timer and kill flag (both also arrive with a wake-up; this is a safety net).
_DUL_WAIT_S = 0.05
#: How often the acceptor looks whether its connection ended while it waits for
#: the association request.
_REQUEST_POLL_S = 0.05


def _split_pdvs(body: bytearray) -> list[tuple[int, memoryview]] | None:
    """The PDVs of a P-DATA-TF body (PS3.8 9.3.5): (context ID, control byte + data).

    None when the items do not fit the body exactly.
    """
    view = memoryview(body)
    pdvs = []
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            return None
        (item_length,) = struct.unpack_from(">L", body, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > len(body):
            return None
        pdvs.append((body[offset + 4], view[offset + 5 : end]))
        offset = end
    return pdvs


def _describe(exc: BaseException) -> str:
    """An exception for the log: its message, or its type when it has none."""
    return str(exc) or type(exc).__name__


def _peer_address(dul: DULServiceProvider) -> str:
    """The peer's IP address, for the log (never anything the peer sent)."""
    with contextlib.suppress(Exception):
        return str(dul.assoc.requestor.address)
    return "an unknown peer"


class MessageQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue, which also knows whether a message is being served.

    A message taken from the queue is "in service" until the taker calls
    :meth:`served`; both happen under the queue's own lock. So the DUL thread can
    :meth:`claim` the association for a C-STORE it has just completed, and serve
    it itself, exactly when nothing else is queued or being served: messages are
    still served one at a time and in the order they arrived.
    """

    in_service: bool = False

    def _get(self) -> Any:
        # Called by Queue.get with self.mutex held.
        self.in_service = True
        return super()._get()

    def claim(self) -> bool:
        """Mark the association busy if nothing is queued or in service; True if so."""
        with self.mutex:
            if self.in_service or self._qsize():
                return False
            self.in_service = True
            return True

    def served(self) -> None:
        """The message taken (or claimed) last has been answered."""
        with self.mutex:
            self.in_service = False


class EventDrivenAssociation(Association):
    """An acceptor association that blocks on its DIMSE queue instead of sleeping."""

    def enable(self) -> None:
        """Turn a pynetdicom acceptor (not started yet) into this class."""
        self.__class__ = EventDrivenAssociation
        # threading.Thread bound pynetdicom's run_reactor as its target in __init__.
        self._target = make_target(self.run_reactor)
        self.dimse.msg_queue.__class__ = MessageQueue

    def run_reactor(self) -> None:
        """pynetdicom's acceptor; then remove what it left in ``incoming/``, free its
        place among the peer's pending connections and, if a dispatcher fed the
        server, count it ended."""
        try:
            super().run_reactor()
        finally:
            self.left_pending()
            self._remove_partial_files()
            if isinstance(self._server, HandoffAssociationServer):
                self._server.association_ended()

    def left_pending(self) -> None:
        """The connection is no longer waiting for its association request (idempotent)."""
        release = getattr(self._server, "release_pending", None)
        key = self.__dict__.pop("pending_key", None)
        if release is not None and key is not None:
            release(key)

    def _remove_partial_files(self) -> None:
        """Delete the data sets of this association that no handler took.

        pynetdicom's own path (a command in several fragments, anything the
        direct path leaves to it) writes each data set to a temporary file in
        ``incoming/`` and deletes it only after the C-STORE handler ran; a data
        set cut off by an abort, or complete but still queued when the
        association ended, stays behind. The direct path cleans up its own
        (:meth:`EventDrivenDUL.run_reactor`).
        """
        paths: list[Any] = []
        message = getattr(self.dimse, "message", None)
        if message is not None:
            handle = getattr(message, "_data_set_file", None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
            paths.append(getattr(message, "_data_set_path", None))
            self.dimse.message = None
        while True:
            try:
                _context_id, primitive = self.dimse.msg_queue.get(block=False)
            except queue.Empty:
                break
            handle = getattr(primitive, "_dataset_file", None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
            paths.append(getattr(primitive, "_dataset_path", None))
        for path in paths:
            if isinstance(path, tuple):  # (path, offset): a file pynetdicom did not write
                continue
            if path is not None:
                Path(path).unlink(missing_ok=True)

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            # Pause point for pynetdicom's send_*() methods called from other threads.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_QUEUE_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg is not None and context_id is not None:
                try:
                    self._serve_request(msg, context_id)
                finally:
                    self.dimse.msg_queue.served()  # type: ignore[attr-defined]
            if self._ended():
                return

    def kill(self) -> None:
        """Stop the association; from the DUL thread itself, without waiting for it.

        pynetdicom's ``kill`` waits until the DUL thread has stopped, which the
        DUL thread cannot do while it serves a request (:meth:`EventDrivenDUL._finish_incoming`).
        """
        if threading.current_thread() is not self.dul:
            super().kill()
            return
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        self.dul.kill_dul()

    def _ended(self) -> bool:
        """Handle a release, an abort, a dead DUL or a network timeout; True when over."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # let EVT_ACSE_RECV subscribers see the abort
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.warning("network timeout: aborting association")
            self.abort()
            self.kill()
            return True
        return False


class EventDrivenDUL(DULServiceProvider):
    """A DUL reactor that sleeps in ``select`` until there is something to do.

    pynetdicom's loop (``DULServiceProvider.run_reactor``) does one step per
    iteration: send a queued primitive or read one PDU, then run one state
    machine event. This loop does the same steps in the same order; the idle
    wait differs, and :meth:`_read_pdu_data` hands P-DATA-TF PDUs to
    :meth:`_take_p_data`. Call :meth:`enable` on a freshly built DUL.
    """

    _wake_reader: socket.socket
    _wake_writer: socket.socket
    #: The C-STORE data set being received on the direct path, if any.
    _incoming: IncomingDataSet | None
    #: Its buffers, made for the first data set and kept for the association.
    _staging: StagingBuffers | None
    #: True until the whole A-ASSOCIATE-RQ has been read.
    _awaiting_request: bool
    #: When (``time.monotonic``) the A-ASSOCIATE-RQ must have arrived.
    _request_deadline: float
    #: Seconds one PDU may take from its first byte to its last.
    _pdu_time_s: float
    #: Bytes of the DIMSE command set pynetdicom is gathering (fragments so far).
    _command_bytes: int

    def enable(self) -> None:
        """Turn a pynetdicom DUL (not started yet) into this class."""
        self.__class__ = EventDrivenDUL
        # threading.Thread bound pynetdicom's run_reactor as its target in __init__.
        self._target = make_target(self.run_reactor)
        self._incoming = None
        self._staging = None
        # The whole A-ASSOCIATE-RQ must arrive within acse_timeout_s of the connection.
        self._awaiting_request = True
        self._request_deadline = time.monotonic() + float(self.assoc.acse_timeout or 30)
        self._pdu_time_s = float(self.assoc.network_timeout or 60)
        self._command_bytes = 0
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_writer.send(b"\0")

    def send_pdu(self, primitive: object) -> None:
        """Queue a primitive for the peer (as pynetdicom does) and wake the reactor."""
        super().send_pdu(primitive)  # type: ignore[arg-type]
        self._wake()

    def kill_dul(self) -> None:
        """Stop the reactor thread; it exits at once instead of after its next wait."""
        super().kill_dul()
        self._wake()

    def _read_pdu_data(self) -> None:
        """Read one PDU; a middle fragment of a data set goes straight to its file.

        Anything else (and any PDU while someone listens to raw PDU events) is
        given to pynetdicom exactly as its own reader would. A PDU whose length
        is over the limit (:meth:`_pdu_limit`) is never read: the association
        is aborted. Each PDU must arrive before its deadline
        (:meth:`_pdu_deadline`), however slowly its bytes come.
        """
        sock = self.socket
        assert isinstance(sock, BulkReadSocket)
        try:
            if self._incoming is not None and self._receive_fragments(sock):
                return
            while True:
                try:
                    sock.deadline = self._pdu_deadline()
                    header = sock.recv(6)
                    if len(header) < 6:
                        # The peer closed the connection (pynetdicom: READ_PDU_EXC_A/B).
                        self._transport_ended()
                        return
                    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
                    if pdu_type not in _PDU_TYPES:
                        log.error("unknown PDU type 0x%02X received", pdu_type)
                        self.event_queue.put("Evt19")
                        return
                    self._check_pdu_length(pdu_type, pdu_length)
                    body = sock.recv(pdu_length)
                except TimeoutError:
                    self._too_slow()
                    return
                except OSError as exc:
                    log.error("connection lost while reading a PDU: %s", _describe(exc))
                    self._transport_ended()
                    return
                finally:
                    sock.deadline = None
                if len(body) != pdu_length:
                    log.error(
                        "connection closed inside a PDU (%d of %d bytes received)",
                        len(body),
                        pdu_length,
                    )
                    self.event_queue.put("Evt17")
                    return
                if pdu_type == _A_ASSOCIATE_RQ:
                    self._awaiting_request = False
                if pdu_type != _P_DATA_TF:
                    break
                pdvs = _split_pdvs(body)
                if pdvs is None:
                    raise PeerLimitError("a PDV item's length runs past the end of its PDU")
                self._count_command_bytes(pdvs)
                if not self._take_p_data(pdvs):
                    break
                # PDUs already read ahead are handled without a trip round the reactor,
                # unless the state machine now has something to do.
                if sock.buffered() < 6 or not self.event_queue.empty():
                    return
        except PeerLimitError as exc:
            self._abort_connection(str(exc), exc.reason)
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            log.exception("unable to decode a received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _lost(self, exc: BaseException) -> None:
        """A read on the direct path failed: too slow, or the connection broke."""
        if isinstance(exc, TimeoutError):
            self._too_slow()
            return
        log.error("connection lost while reading a PDU: %s", _describe(exc))
        self.event_queue.put("Evt17")

    def _too_slow(self) -> None:
        """A read passed its deadline: log why, once, and close the connection."""
        log.warning(
            "closing the connection from %s: %s",
            _peer_address(self),
            REQUEST_TOO_SLOW if self._awaiting_request else PDU_TOO_SLOW,
        )
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        sock = self.socket
        if sock is not None and sock.socket is not None:
            sock.close()  # queues Evt17
        else:
            self.event_queue.put("Evt17")
        assoc = self.assoc
        if self._awaiting_request and isinstance(assoc, EventDrivenAssociation):
            assoc.left_pending()

    def _transport_ended(self) -> None:
        """The connection ended (Evt17); one that never sent its request stops being
        pending at once, not when the association thread notices."""
        self.event_queue.put("Evt17")
        assoc = self.assoc
        if self._awaiting_request and isinstance(assoc, EventDrivenAssociation):
            assoc.left_pending()

    def _pdu_deadline(self) -> float:
        """When the PDU about to be read must be complete (``time.monotonic``)."""
        if self._awaiting_request:
            return self._request_deadline
        return time.monotonic() + self._pdu_time_s

    def _pdu_limit(self, pdu_type: int) -> int:
        """The largest length a PDU of ``pdu_type`` may declare now (:func:`pdu_limit`)."""
        return pdu_limit(
            pdu_type,
            self._awaiting_request,
            int(self.assoc.acceptor.maximum_length or 2**32 - 1),
        )

    def _check_pdu_length(self, pdu_type: int, pdu_length: int) -> None:
        """Raise :class:`PeerLimitError` when ``pdu_length`` is over :meth:`_pdu_limit`."""
        check_pdu_length(
            pdu_type,
            pdu_length,
            self._awaiting_request,
            int(self.assoc.acceptor.maximum_length or 2**32 - 1),
        )

    def _count_command_bytes(self, pdvs: list[tuple[int, memoryview]]) -> None:
        """Keep the command set pynetdicom gathers in memory under :data:`COMMAND_SET_LIMIT`."""
        for _context_id, pdv in pdvs:
            control = pdv[0]
            if not control & 0b01:
                continue
            self._command_bytes += len(pdv) - 1
            if self._command_bytes > COMMAND_SET_LIMIT:
                raise PeerLimitError(
                    f"a DIMSE command set of more than {COMMAND_SET_LIMIT} bytes",
                    ABORT_UNEXPECTED_PARAMETER,
                )
            if control & 0b10:
                self._command_bytes = 0

    def _abort_connection(self, what: str, reason: int) -> None:
        """A-P-ABORT with ``reason``, logged once (no patient data), and close.

        The A-ABORT goes out at once, then the connection is closed (Evt17), so
        nothing more is read from a peer that broke a limit.
        """
        log.error("aborting association with %s: %s", _peer_address(self), what)
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        abort = A_ABORT_RQ()
        abort.source = _ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = reason
        sock = self.socket
        if sock is not None:
            conn = sock.socket
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.settimeout(1.0)
                    conn.sendall(abort.encode())
            # Closing queues Evt17 (transport closed): an A-P-ABORT indication in
            # data transfer, the end of the connection before it.
            sock.close()

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """pynetdicom's ``receive_pdu``; the acceptor's wait for its request ends early.

        The association thread waits here for the A-ASSOCIATE-RQ. pynetdicom
        waits the whole ``acse_timeout_s`` even when the peer has already
        closed the connection; this returns None as soon as the connection has
        ended or the request's deadline has passed. Once the request is in,
        the connection no longer counts among the peer's pending ones.
        """
        if not (wait and self.assoc.is_acceptor and self.assoc.requestor.primitive is None):
            return super().receive_pdu(wait, timeout)
        opened = False
        while True:
            primitive = super().receive_pdu(True, _REQUEST_POLL_S)
            if primitive is not None:
                assoc = self.assoc
                if isinstance(assoc, EventDrivenAssociation):
                    assoc.left_pending()
                return primitive
            state = self.state_machine.current_state
            opened = opened or state != "Sta1"
            if (
                (opened and state == "Sta1")
                or not self.is_alive()
                or time.monotonic() > self._request_deadline + _REQUEST_POLL_S
            ):
                return None

    def _receive_fragments(self, sock: BulkReadSocket) -> bool:
        """Read the data set's next fragments straight into its staging buffer.

        For each P-DATA-TF that holds one PDV continuing the data set being
        received, the PDU and PDV headers (12 bytes) are read on their own and
        the fragment goes from the connection into the buffer in one copy
        (the general path reads ahead, copies each PDU into a body, then into the
        buffer). Continues while more is readable and nothing waits to be
        sent. Returns False, with the header put back, when the next PDU is
        anything else: the general path then reads it.
        """
        if not self._direct_path_open():
            return False
        lost: list[BaseException] = []

        def read_into(view: memoryview) -> int:
            try:
                return sock.recv_into_exact(view)
            except (OSError, TimeoutError) as exc:
                lost.append(exc)
                return 0

        incoming = self._incoming
        header = bytearray(12)
        limit = self._pdu_limit(_P_DATA_TF)
        while incoming is not None:
            # The PDU header alone first: an A-ABORT or A-RELEASE-RQ is shorter
            # than the 12 bytes that a P-DATA-TF's two headers take.
            sock.deadline = self._pdu_deadline()
            with memoryview(header) as view:
                got = read_into(view[:6])
                (pdu_length,) = struct.unpack_from(">L", header, 2)
                if got == 6 and header[0] == _P_DATA_TF and 6 <= pdu_length <= limit:
                    got += read_into(view[6:])
            if lost:
                sock.deadline = None
                self._lost(lost[0])
                return True
            item_length, context_id, control = struct.unpack_from(">LBB", header, 6)
            if not (
                got == 12
                and header[0] == _P_DATA_TF
                and pdu_length == item_length + 4
                and item_length >= 2
                and context_id == incoming.context_id
                and not control & 0b01
            ):
                # Anything else (an over-long PDU included), or a connection closed
                # early: the general path reads it, and checks it.
                sock.deadline = None
                sock.unread(header[:got])
                return False
            received = incoming.receive(read_into, item_length - 2)
            sock.deadline = None
            if not received:
                if lost:
                    self._lost(lost[0])
                else:
                    log.error("connection closed inside a PDU of %d bytes", pdu_length)
                    self.event_queue.put("Evt17")
                return True
            if control & 0b10:
                self._finish_incoming()
            incoming = self._incoming
            if self._kill_thread or not self.to_provider_queue.empty() or not sock.ready:
                break
        return True

    def _direct_path_open(self) -> bool:
        """Whether this thread may handle P-DATA itself, past pynetdicom's machinery.

        Only in data transfer (Sta6), with no earlier PDU or event still waiting
        for the state machine (so everything stays in order), and with nobody
        listening to the events the direct path does not raise.
        """
        return (
            self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and self._recv_pdu.empty()
            and not self._listened()
        )

    def _listened(self) -> bool:
        """Whether anyone listens to the events the direct path does not raise."""
        return any(
            self.assoc.get_handlers(event)
            for event in (
                evt.EVT_PDU_RECV,
                evt.EVT_DATA_RECV,
                evt.EVT_DIMSE_RECV,
                evt.EVT_FSM_TRANSITION,
            )
        )

    def _take_p_data(self, pdvs: list[tuple[int, memoryview]]) -> bool:
        """Handle a P-DATA-TF's PDVs here; False leaves the whole PDU to pynetdicom.

        Only while :meth:`_direct_path_open`. PDVs that are not part of a
        C-STORE on the direct path go to pynetdicom's DIMSE layer, in order, as
        its DT-2 action would pass them.
        """
        if not self._direct_path_open():
            return False
        dimse = self.assoc.dimse
        if self._incoming is None and dimse.message is not None:
            return False  # pynetdicom is inside a message (a command in fragments): it ends it
        for index, (context_id, pdv) in enumerate(pdvs):
            control = pdv[0]
            incoming = self._incoming
            if incoming is not None:
                if control & 0b01 or context_id != incoming.context_id:
                    self._protocol_error(
                        f"a PDV (context {context_id}, control 0x{control:02X}) arrived in the "
                        f"middle of a data set on context {incoming.context_id}"
                    )
                    return True
                incoming.write(pdv[1:])
                if control & 0b10:
                    self._finish_incoming()
            elif control != 0b11 or not self._start_incoming(context_id, pdv[1:]):
                self._to_dimse(pdvs[index:])
                return True
        return True

    def _start_incoming(self, context_id: int, command: memoryview) -> bool:
        """Begin a C-STORE on the direct path from a complete command set."""
        context = self.assoc._accepted_cx.get(context_id)
        primitive = decode_c_store_rq(command) if context is not None else None
        if context is None or primitive is None:
            return False
        if self._staging is None:
            self._staging = StagingBuffers()
        self._incoming = IncomingDataSet.open(
            Path(tempfile.gettempdir()),
            context_id,
            primitive,
            str(context.transfer_syntax[0]),
            self._staging,
        )
        return True

    def _finish_incoming(self) -> None:
        """The data set is complete: serve the request here, or queue it.

        When the association thread is idle (the usual case: a sender waits for
        each response), this thread runs pynetdicom's Storage SCP, our C-STORE
        handler and the response itself. That saves two thread hand-offs per
        instance, which is most of the latency between instances on one
        association. Otherwise the request goes on the association's message
        queue, where pynetdicom's DIMSE layer would have put it.
        """
        assert self._incoming is not None
        self._incoming.finish()  # on failure, run_reactor discards it
        incoming, self._incoming = self._incoming, None
        messages: MessageQueue = self.assoc.dimse.msg_queue  # type: ignore[assignment]
        if not messages.claim():
            messages.put((incoming.context_id, incoming.primitive))
            return
        try:
            self.assoc._serve_request(incoming.primitive, incoming.context_id)
        finally:
            messages.served()

    def _to_dimse(self, pdvs: list[tuple[int, memoryview]]) -> None:
        """Give PDVs to pynetdicom's DIMSE layer, as its DT-2 action does."""
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[cid, bytes(pdv)] for cid, pdv in pdvs]  # type: ignore[misc]
        self.assoc.dimse.receive_primitive(primitive)

    def _protocol_error(self, what: str) -> None:
        """Drop the data set in progress and let the state machine abort (Evt19)."""
        log.error("aborting association: %s", what)
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        self.event_queue.put("Evt19")

    def _wait_for_work(self) -> None:
        """Block until the peer sent data, a primitive was queued, or the wait ran out."""
        if not self.to_provider_queue.empty() or self._kill_thread:
            return
        conn = self.socket.socket if self.socket is not None else None
        if conn is None or conn.fileno() < 0:
            # Closed transport (Sta13 and after): nothing to select on; the state
            # machine's events are already queued, the ARTIM timer needs a look.
            readable, _, _ = select.select([self._wake_reader], [], [], 0.001)
        elif isinstance(conn, ssl.SSLSocket) and conn.pending():
            return  # TLS has buffered plaintext that select cannot see
        elif isinstance(self.socket, BulkReadSocket) and self.socket.buffered():
            return  # read ahead already
        else:
            readable, _, _ = select.select([conn, self._wake_reader], [], [], _DUL_WAIT_S)
        if self._wake_reader in readable:  # drain the wake-ups (most waits end for data)
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_reader.recv(4096):
                    pass

    def run_reactor(self) -> None:
        """pynetdicom's reactor steps, waiting in :meth:`_wait_for_work` when idle."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    log.exception("DUL failed: aborting association")
                    self._abort_after_failure()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait_for_work()
                    continue
                self.state_machine.do_action(event)
        finally:
            if self._incoming is not None:  # the association ended inside a data set
                self._incoming.discard()
                self._incoming = None
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            self._wake_reader.close()
            self._wake_writer.close()

    def _abort_after_failure(self) -> None:
        """What pynetdicom does when its reactor raises: A-ABORT, then stop both threads."""
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class FastStoreResponseDIMSE(DIMSEServiceProvider):
    """Sends C-STORE responses with :func:`encode_c_store_rsp`, all else as pynetdicom."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE response skips pydicom."""
        encoded = (
            encode_c_store_rsp(primitive)
            if isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
            else None
        )
        if encoded is None or (self.maximum_pdu_size and len(encoded) + 6 > self.maximum_pdu_size):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # Message control header 0x03: command information, last fragment (PS3.8 E.2).
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        self.dul.send_pdu(pdata)


class BulkReadSocket(AssociationSocket):
    """An association socket that reads ahead, so that a PDU costs few system calls.

    Each ``recv_into`` asks the kernel for up to :data:`_READ_AHEAD` bytes; what
    goes beyond the PDU being read waits in :attr:`_pending` for the next one.
    :attr:`ready` counts those bytes, as pynetdicom does for TLS's own buffer.
    """

    _pending: bytearray
    _scratch: bytearray
    #: When (``time.monotonic``) the PDU being read must be complete; None: no limit.
    #: Every read waits at most until then, so a peer that trickles bytes cannot
    #: hold a read open by restarting a per-read timeout.
    deadline: float | None = None

    def _recv_into(self, conn: socket.socket, view: memoryview, nbytes: int) -> int:
        """One ``recv_into``, which waits no later than :attr:`deadline`."""
        deadline = self.deadline
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the PDU was not complete before its deadline")
            conn.settimeout(remaining)
        return conn.recv_into(view, nbytes)

    def send(self, bytestream: bytes) -> None:
        """Send as pynetdicom does, waiting at most the network timeout for the peer.

        A read may have left a short deadline on the connection; and a peer that
        never reads must not hold this thread for ever.
        """
        conn = self.socket
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.settimeout(self.assoc.network_timeout)
        super().send(bytestream)

    def buffered(self) -> int:
        """Bytes already read from the connection and not yet handed out."""
        return len(self.__dict__.get("_pending", b""))

    @property
    def ready(self) -> bool:  # type: ignore[override]
        """Whether a read would return data at once (buffered bytes count)."""
        return self.buffered() > 0 or AssociationSocket.ready.fget(self)  # type: ignore[attr-defined]

    def recv_into_exact(self, view: memoryview) -> int:
        """Fill ``view``: bytes read ahead first, then straight from the connection.

        Returns how many bytes it filled (fewer only if the peer closed the
        connection).
        """
        filled = 0
        pending = self.__dict__.get("_pending")
        if pending:
            filled = min(len(pending), len(view))
            view[:filled] = pending[:filled]
            del pending[:filled]
        conn = self.socket
        assert conn is not None
        while filled < len(view):
            count = self._recv_into(conn, view[filled:], len(view) - filled)
            if count == 0:
                break
            filled += count
        return filled

    def _ensure_buffers(self) -> None:
        """Create the read-ahead buffers on first use (pynetdicom built this object)."""
        if "_pending" not in self.__dict__:
            self._pending = bytearray()
            self._scratch = bytearray(_READ_AHEAD)

    def unread(self, data: bytes | bytearray) -> None:
        """Put ``data`` back in front of the bytes read ahead."""
        self._ensure_buffers()
        self._pending[:0] = data

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection)."""
        self._ensure_buffers()
        if len(self._pending) >= nr_bytes:
            out = self._pending[:nr_bytes]
            del self._pending[:nr_bytes]
            return out
        out = self._pending
        self._pending = bytearray()
        conn = self.socket
        assert conn is not None
        scratch = memoryview(self._scratch)
        while len(out) < nr_bytes:
            missing = nr_bytes - len(out)
            if missing >= _READ_AHEAD:
                # Large remainders go straight into the result, no extra copy.
                start = len(out)
                out.extend(bytes(missing))
                count = self._recv_into(conn, memoryview(out)[start:], missing)
                del out[start + count :]
            else:
                count = self._recv_into(conn, scratch, _READ_AHEAD)
                out += scratch[: min(count, missing)]
                if count > missing:
                    self._pending += scratch[missing:count]
            if count == 0:
                break
        return out


class EventDrivenRequestHandler(RequestHandler):
    """Builds :class:`EventDrivenAssociation` acceptors with an :class:`EventDrivenDUL`
    on a :class:`BulkReadSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        EventDrivenAssociation.enable(assoc)  # type: ignore[arg-type]
        # Pending until its A-ASSOCIATE-RQ arrives (PendingConnectionLimit).
        assoc.pending_key = self.request  # type: ignore[attr-defined]
        EventDrivenDUL.enable(assoc.dul)  # type: ignore[arg-type]
        assoc.dimse.__class__ = FastStoreResponseDIMSE
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc
