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
* The bulk of a C-STORE is P-DATA-TF PDUs that each carry one more piece of the
  data set. :meth:`EventDrivenDUL._read_pdu_data` appends those straight to the
  file pynetdicom opened for the data set, skipping the PDU objects, the state
  machine and the DIMSE layer (about 0.1 ms per PDU; a 10 MB radiograph in 64 KiB
  PDUs is 160 of them). Every other PDU, the last fragment of a data set
  included, takes pynetdicom's path, so the message is completed, decoded and
  answered by pynetdicom as always.
* :class:`FastStoreResponseDIMSE` encodes the C-STORE response's command set
  (six fixed elements) directly instead of through a pydicom ``Dataset``
  (0.4 ms per instance); anything else is sent by pynetdicom.

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

from dicomnode.storage import start_writeback

log = logging.getLogger("dicomnode.receive")

#: How long the reactor blocks on the message queue before it checks for a
#: release, an abort or a network timeout. A message wakes it at once.
_QUEUE_WAIT_S = 0.005
#: PDU types of PS3.8 9.3 (pynetdicom's reader refuses anything else).
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
#: Bytes asked of the kernel per read (a few 64 KiB PDUs at a time).
_READ_AHEAD = 256 * 1024
#: Received bytes after which the kernel is told to start writing the data set
#: file back, so that the final fsync finds most of it on disk already.
_WRITEBACK_BYTES = 1024 * 1024
#: Longest the DUL sleeps in ``select`` without a wake-up, to look at its ARTIM
#: timer and kill flag (both also arrive with a wake-up; this is a safety net).
_DUL_WAIT_S = 0.05


class EventDrivenAssociation(Association):
    """An acceptor association that blocks on its DIMSE queue instead of sleeping."""

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
                self._serve_request(msg, context_id)
            if self._ended():
                return

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
    wait differs, and :meth:`_read_pdu_data` writes middle fragments of a data
    set to its file itself. Call :meth:`enable` on a freshly built DUL.
    """

    _wake_reader: socket.socket
    _wake_writer: socket.socket
    #: Data set bytes written since the last writeback hint.
    _unsynced: int

    def enable(self) -> None:
        """Turn a pynetdicom DUL (not started yet) into this class."""
        self.__class__ = EventDrivenDUL
        # threading.Thread bound pynetdicom's run_reactor as its target in __init__.
        self._target = make_target(self.run_reactor)
        self._unsynced = 0
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
        given to pynetdicom exactly as its own reader would.
        """
        sock = self.socket
        assert isinstance(sock, BulkReadSocket)
        while True:
            try:
                header = sock.recv(6)
                if len(header) < 6:
                    # The peer closed the connection (pynetdicom: READ_PDU_EXC_A/B).
                    self.event_queue.put("Evt17")
                    return
                pdu_type, _, pdu_length = struct.unpack(">BBL", header)
                if pdu_type not in _PDU_TYPES:
                    log.error("unknown PDU type 0x%02X received", pdu_type)
                    self.event_queue.put("Evt19")
                    return
                body = sock.recv(pdu_length)
            except (OSError, TimeoutError) as exc:
                log.error("connection lost while reading a PDU: %s", exc)
                self.event_queue.put("Evt17")
                return
            if len(body) != pdu_length:
                log.error(
                    "connection closed inside a PDU (%d of %d bytes received)",
                    len(body),
                    pdu_length,
                )
                self.event_queue.put("Evt17")
                return
            if not (pdu_type == _P_DATA_TF and self._append_data_fragments(body)):
                break
            # Fragments already read ahead are written without a trip round the reactor.
            if sock.buffered() < 6:
                return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            log.exception("unable to decode a received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _append_data_fragments(self, body: bytearray) -> bool:
        """Write a P-DATA-TF's data set fragments to the open data set file.

        Returns False, having written nothing, unless the association is in
        data transfer (Sta6), no earlier PDU or event is still waiting for the
        state machine (so fragments stay in order), a C-STORE data set is being
        received into a file, nobody listens to raw PDU events, and every PDV in
        ``body`` is a data set fragment of that message's presentation context
        that is not the last one.
        """
        message = self.assoc.dimse.message
        target = getattr(message, "_data_set_file", None) if message is not None else None
        if (
            target is None
            or self.state_machine.current_state != "Sta6"
            or not self.event_queue.empty()
            or not self._recv_pdu.empty()
            or self.assoc.get_handlers(evt.EVT_PDU_RECV)
            or self.assoc.get_handlers(evt.EVT_DATA_RECV)
        ):
            return False
        view = memoryview(body)
        fragments = []
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                return False
            (item_length,) = struct.unpack_from(">L", body, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > len(body):
                return False
            context_id, control = body[offset + 4], body[offset + 5]
            if control & 0b11 or context_id != message.context_id:
                return False  # a command fragment, the last data fragment, or another context
            fragments.append(view[offset + 6 : end])
            offset = end
        for fragment in fragments:
            target.write(fragment)
        target.flush()
        written = self._unsynced + len(body)
        if written >= _WRITEBACK_BYTES:
            start_writeback(target.fileno())
            written = 0
        self._unsynced = written
        return True

    def _wait_for_work(self) -> None:
        """Block until the peer sent data, a primitive was queued, or the wait ran out."""
        if not self.to_provider_queue.empty() or self._kill_thread:
            return
        conn = self.socket.socket if self.socket is not None else None
        if conn is None or conn.fileno() < 0:
            # Closed transport (Sta13 and after): nothing to select on; the state
            # machine's events are already queued, the ARTIM timer needs a look.
            select.select([self._wake_reader], [], [], 0.001)
        elif isinstance(conn, ssl.SSLSocket) and conn.pending():
            return  # TLS has buffered plaintext that select cannot see
        elif isinstance(self.socket, BulkReadSocket) and self.socket.buffered():
            return  # read ahead already
        else:
            select.select([conn, self._wake_reader], [], [], _DUL_WAIT_S)
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


def _command_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, implicit VR little endian (PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _command_uid(uid: object) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE response (PS3.7 9.3.1.2), encoded.

    The same bytes as pynetdicom's encoder, which the unit tests check; None
    when the response carries an Error Comment or Offending Element, which are
    left to pynetdicom.
    """
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if primitive.Status is None or primitive.MessageIDBeingRespondedTo is None:
        return None
    elements = b""
    if primitive.AffectedSOPClassUID is not None:
        elements += _command_element(0x0002, _command_uid(primitive.AffectedSOPClassUID))
    elements += _command_element(0x0100, struct.pack("<H", 0x8001))  # C-STORE-RSP
    elements += _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo))
    elements += _command_element(0x0800, struct.pack("<H", 0x0101))  # no data set
    elements += _command_element(0x0900, struct.pack("<H", primitive.Status))
    if primitive.AffectedSOPInstanceUID is not None:
        elements += _command_element(0x1000, _command_uid(primitive.AffectedSOPInstanceUID))
    return _command_element(0x0000, struct.pack("<L", len(elements))) + elements


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

    def buffered(self) -> int:
        """Bytes already read from the connection and not yet handed out."""
        return len(self.__dict__.get("_pending", b""))

    @property
    def ready(self) -> bool:  # type: ignore[override]
        """Whether a read would return data at once (buffered bytes count)."""
        return self.buffered() > 0 or AssociationSocket.ready.fget(self)  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection)."""
        if "_pending" not in self.__dict__:
            self._pending = bytearray()
            self._scratch = bytearray(_READ_AHEAD)
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
                count = conn.recv_into(memoryview(out)[start:], missing)
                del out[start + count :]
            else:
                count = conn.recv_into(scratch, _READ_AHEAD)
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
        assoc.__class__ = EventDrivenAssociation
        EventDrivenDUL.enable(assoc.dul)  # type: ignore[arg-type]
        assoc.dimse.__class__ = FastStoreResponseDIMSE
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc
