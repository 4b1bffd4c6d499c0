"""What a peer may send on the DICOM port, and the socket-level guard of the stock path.

The limits (docs/security.md) hold on both receive paths. The fast path
(:mod:`dicomnode.receive.fastpath`) checks them in its own PDU reader. On the
stock path (``receive.fast_path = false``) pynetdicom reads each PDU itself, so
:class:`GuardedSocket` stands between it and the accepted connection: it follows
the PDU stream as pynetdicom reads it (a header of 6 bytes, then the declared
length) and

* aborts (A-ABORT, source service-provider) a PDU whose header declares more
  than :func:`pdu_limit` allows, before any of its body is read;
* aborts a P-DATA-TF whose PDV item runs past the end of its PDU, or a DIMSE
  command set longer than :data:`COMMAND_SET_LIMIT` over its fragments;
* makes every read wait no later than the PDU's deadline: the whole
  A-ASSOCIATE-RQ within ``acse_timeout_s`` of connecting, each later PDU within
  ``network_timeout_s`` of its first byte, however often bytes arrive.

Only pynetdicom's public behaviour is relied on: its ``AssociationSocket`` reads
through the wrapped object's ``recv`` and ends the connection (Evt17) when a
read raises ``OSError``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dicomnode.receive")

#: PDU types of PS3.8 9.3 (pynetdicom's reader refuses anything else).
PDU_TYPES = frozenset(range(0x01, 0x08))
A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
#: Largest PDU read before the association request has arrived, and of any PDU
#: other than P-DATA-TF (an A-ASSOCIATE-RQ with 128 presentation contexts of 20
#: transfer syntaxes each is about 70 KB; A-RELEASE and A-ABORT are 10 bytes).
CONTROL_PDU_LIMIT = 256 * 1024
#: Bytes of one DIMSE command set, over its fragments, that pynetdicom may gather
#: in memory (a C-STORE-RQ's is about 200 bytes).
COMMAND_SET_LIMIT = 64 * 1024
#: A-ABORT source and reasons (PS3.8 9.3.8): service-provider (A-P-ABORT),
#: unexpected PDU parameter, invalid PDU parameter value.
ABORT_SOURCE_PROVIDER = 0x02
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06
#: The log's words for a read past its deadline, before and after the request.
REQUEST_TOO_SLOW = "its association request was not complete within receive.acse_timeout_s"
PDU_TOO_SLOW = "a PDU was not complete within receive.network_timeout_s"


class PeerLimitError(Exception):
    """The peer broke a limit: the association is aborted (A-P-ABORT) with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def pdu_limit(pdu_type: int, awaiting_request: bool, max_pdu_size: int) -> int:
    """The largest length a PDU of ``pdu_type`` may declare now.

    P-DATA-TF after the association request: the maximum length this node
    announced in its A-ASSOCIATE-AC (``receive.max_pdu_size``; PS3.8 D.1
    counts the PDU's variable field, which is what its length gives).
    Anything else, or before the request: :data:`CONTROL_PDU_LIMIT`.
    """
    if pdu_type == P_DATA_TF and not awaiting_request:
        return max_pdu_size
    return CONTROL_PDU_LIMIT


def check_pdu_length(
    pdu_type: int, pdu_length: int, awaiting_request: bool, max_pdu_size: int
) -> None:
    """Raise :class:`PeerLimitError` when ``pdu_length`` is over :func:`pdu_limit`."""
    limit = pdu_limit(pdu_type, awaiting_request, max_pdu_size)
    if pdu_length > limit:
        raise PeerLimitError(
            f"PDU of type 0x{pdu_type:02X} declares {pdu_length} bytes, more than the "
            f"{limit} allowed"
            + (" (receive.max_pdu_size)" if pdu_type == P_DATA_TF else "")
            + (" before the association request" if awaiting_request else "")
        )


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (PS3.8 9.3.8) with ``reason``."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER, reason)


class GuardedSocket:
    """The accepted connection as pynetdicom's stock path reads it, with the limits.

    Everything but ``recv`` goes to the wrapped socket. Not for TLS connections
    (pynetdicom looks for buffered TLS data only on an ``ssl.SSLSocket``).
    ``on_ended`` is called once when the connection has ended.
    """

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        max_pdu_size: int,
        acse_timeout_s: float,
        network_timeout_s: float,
        on_ended: Callable[[], None] = lambda: None,
    ) -> None:
        self._sock = sock
        #: Called once the connection has ended, as soon as a read finds it closed or
        #: the guard closes it (the association thread may notice much later).
        self._on_ended: Callable[[], None] | None = on_ended
        self._peer = peer
        self._max_pdu_size = max_pdu_size
        self._network_timeout_s = network_timeout_s
        self._awaiting_request = True
        #: When the PDU being read must be complete (``time.monotonic``); None: between PDUs.
        self._deadline: float | None = time.monotonic() + acse_timeout_s
        self._header = bytearray()
        self._pdu_type = 0
        #: Body bytes of the PDU being read that pynetdicom has not read yet.
        self._body_left = 0
        #: P-DATA-TF parsing: bytes of the PDV item header gathered, data left in the item.
        self._item_header = bytearray()
        self._item_left = 0
        self._item_is_command = False
        self._command_bytes = 0
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def send(self, data: bytes, flags: int = 0) -> int:
        """``socket.send``, waiting at most ``network_timeout_s`` for a peer that does not
        read (a read may have left a short deadline on the connection)."""
        self._sock.settimeout(self._network_timeout_s)
        return self._sock.send(data, flags)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        """``socket.sendall``, like :meth:`send`."""
        self._sock.settimeout(self._network_timeout_s)
        self._sock.sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read as ``socket.recv``, within the PDU's deadline and the limits."""
        if self._closed:
            return b""
        try:
            if self._body_left == 0:
                return self._recv_header(bufsize)
            data = self._read(min(bufsize, self._body_left))
            self._body_left -= len(data)
            if self._pdu_type == P_DATA_TF:
                self._follow_pdvs(data)
            if self._body_left == 0:
                self._pdu_complete()
            return data
        except PeerLimitError as exc:
            self._abort(str(exc), exc.reason)
        except TimeoutError:
            log.warning(
                "closing the connection from %s: %s",
                self._peer,
                REQUEST_TOO_SLOW if self._awaiting_request else PDU_TOO_SLOW,
            )
            self._close()
        # To pynetdicom the connection has closed: Evt17, and nothing more is read.
        return b""

    def _recv_header(self, bufsize: int) -> bytes:
        if not self._header and not self._awaiting_request:
            self._deadline = time.monotonic() + self._network_timeout_s
        data = self._read(min(bufsize, 6 - len(self._header)))
        self._header += data
        if len(self._header) == 6:
            pdu_type, _, pdu_length = struct.unpack(">BBL", self._header)
            self._header.clear()
            if pdu_type in PDU_TYPES:  # pynetdicom refuses the others itself
                check_pdu_length(pdu_type, pdu_length, self._awaiting_request, self._max_pdu_size)
            self._pdu_type = pdu_type
            self._body_left = pdu_length
            self._item_header.clear()
            self._item_left = 0
            if pdu_length == 0:
                self._pdu_complete()
        return data

    def _follow_pdvs(self, data: bytes) -> None:
        """Follow the PDV items (PS3.8 9.3.5) of a P-DATA-TF body as it passes."""
        view = memoryview(data)
        while view:
            if self._item_left == 0:
                take = min(6 - len(self._item_header), len(view))
                self._item_header += view[:take]
                view = view[take:]
                if len(self._item_header) < 6:
                    continue
                (item_length,) = struct.unpack_from(">L", self._item_header)
                control = self._item_header[5]
                self._item_header.clear()
                # The item's length counts its context ID and control byte, read already.
                if item_length < 2 or item_length - 2 > self._body_left + len(view):
                    raise PeerLimitError("a PDV item's length runs past the end of its PDU")
                self._item_left = item_length - 2
                self._item_is_command = bool(control & 0b01)
                if self._item_is_command:
                    self._count_command(item_length - 2, last=bool(control & 0b10))
                continue
            take = min(self._item_left, len(view))
            self._item_left -= take
            view = view[take:]

    def _count_command(self, count: int, last: bool) -> None:
        self._command_bytes += count
        if self._command_bytes > COMMAND_SET_LIMIT:
            raise PeerLimitError(
                f"a DIMSE command set of more than {COMMAND_SET_LIMIT} bytes",
                ABORT_UNEXPECTED_PARAMETER,
            )
        if last:
            self._command_bytes = 0

    def _pdu_complete(self) -> None:
        if self._pdu_type == A_ASSOCIATE_RQ:
            self._awaiting_request = False
        if self._pdu_type == P_DATA_TF and (self._item_left or self._item_header):
            raise PeerLimitError("a PDV item's length runs past the end of its PDU")
        self._deadline = None

    def _read(self, count: int) -> bytes:
        deadline = self._deadline
        if deadline is None:
            self._sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the PDU was not complete before its deadline")
            self._sock.settimeout(remaining)
        data = self._sock.recv(count)
        if not data:
            self._ended()
        return data

    def _ended(self) -> None:
        on_ended, self._on_ended = self._on_ended, None
        if on_ended is not None:
            on_ended()

    def _abort(self, what: str, reason: int) -> None:
        """A-P-ABORT with ``reason``, logged once (no patient data), and close."""
        log.error("aborting association with %s: %s", self._peer, what)
        with contextlib.suppress(OSError):
            self._sock.settimeout(1.0)
            self._sock.sendall(a_abort(reason))
        self._close()

    def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._ended()
