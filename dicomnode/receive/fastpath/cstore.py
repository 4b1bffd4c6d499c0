"""C-STORE messages without pydicom: the request's command set in, the response out.

The receive path spends most of its Python time per instance on a few fixed
structures: a C-STORE-RQ command set (PS3.7 9.3.1.1) of about eight group-0000
elements, the Part 10 file meta header written in front of the data set, and a
C-STORE-RSP command set (PS3.7 9.3.1.2) of six elements. pynetdicom builds each
of them as a pydicom ``Dataset``. This module encodes and decodes them directly.
It produces the same primitive and the same bytes as pynetdicom, which the unit
tests check against pynetdicom's encoder and decoder. Anything it does not
recognise returns None, and the caller leaves that message to pynetdicom.

All command sets are implicit VR little endian (PS3.7 6.3.1). The file meta
header is explicit VR little endian (PS3.10 7.1).
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.storage import start_writeback

#: Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: Command Data Set Type: no data set follows (any other value: one follows).
NO_DATA_SET = 0x0101

# Group 0000 element numbers of a C-STORE-RQ (PS3.7 table 9.3-1).
_GROUP_LENGTH = 0x0000
_AFFECTED_SOP_CLASS_UID = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_PRIORITY = 0x0700
_COMMAND_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE_UID = 0x1000
_MOVE_ORIGINATOR_AE_TITLE = 0x1030
_MOVE_ORIGINATOR_MESSAGE_ID = 0x1031
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_REQUEST_ELEMENTS = frozenset(
    {
        _GROUP_LENGTH,
        _AFFECTED_SOP_CLASS_UID,
        _COMMAND_FIELD,
        _MESSAGE_ID,
        _PRIORITY,
        _COMMAND_DATA_SET_TYPE,
        _AFFECTED_SOP_INSTANCE_UID,
        _MOVE_ORIGINATOR_AE_TITLE,
        _MOVE_ORIGINATOR_MESSAGE_ID,
    }
)


def _command_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, implicit VR little endian."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _padded_uid(uid: object) -> bytes:
    value = str(uid).encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _us(value: bytes) -> int | None:
    return struct.unpack("<H", value)[0] if len(value) == 2 else None


def _text(value: bytes) -> str:
    return value.decode("ascii").rstrip("\0 ")


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE response, encoded.

    None when the response carries an Error Comment or Offending Element, or
    lacks its Status or Message ID Being Responded To.
    """
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if primitive.Status is None or primitive.MessageIDBeingRespondedTo is None:
        return None
    elements = b""
    if primitive.AffectedSOPClassUID is not None:
        elements += _command_element(
            _AFFECTED_SOP_CLASS_UID, _padded_uid(primitive.AffectedSOPClassUID)
        )
    elements += _command_element(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP))
    elements += _command_element(
        _MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", primitive.MessageIDBeingRespondedTo)
    )
    elements += _command_element(_COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET))
    elements += _command_element(_STATUS, struct.pack("<H", primitive.Status))
    if primitive.AffectedSOPInstanceUID is not None:
        elements += _command_element(
            _AFFECTED_SOP_INSTANCE_UID, _padded_uid(primitive.AffectedSOPInstanceUID)
        )
    return _command_element(_GROUP_LENGTH, struct.pack("<L", len(elements))) + elements


def decode_c_store_rq(command: bytes | memoryview) -> C_STORE | None:
    """A C-STORE-RQ primitive from its encoded command set.

    Returns None unless the command set is a well-formed C-STORE-RQ. The
    request must have a data set and hold no element beyond those of
    PS3.7 table 9.3-1. pynetdicom's own setters check the values (UIDs,
    priority); a value they refuse also gives None.
    """
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(command):
        if offset + 8 > len(command):
            return None
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(command) or element in values:
            return None
        values[element] = bytes(command[offset : offset + length])
        offset += length
    if not values.keys() <= _REQUEST_ELEMENTS:
        return None
    field = _us(values.get(_COMMAND_FIELD, b""))
    data_set_type = _us(values.get(_COMMAND_DATA_SET_TYPE, b""))
    message_id = _us(values.get(_MESSAGE_ID, b""))
    priority = _us(values.get(_PRIORITY, b""))
    if field != C_STORE_RQ or data_set_type in (None, NO_DATA_SET) or message_id is None:
        return None
    if _AFFECTED_SOP_CLASS_UID not in values or _AFFECTED_SOP_INSTANCE_UID not in values:
        return None
    primitive = C_STORE()
    try:
        primitive.MessageID = message_id
        primitive.AffectedSOPClassUID = _text(values[_AFFECTED_SOP_CLASS_UID])
        primitive.AffectedSOPInstanceUID = _text(values[_AFFECTED_SOP_INSTANCE_UID])
        primitive.Priority = priority if priority is not None else 0x0000
        if _MOVE_ORIGINATOR_AE_TITLE in values:
            primitive.MoveOriginatorApplicationEntityTitle = _text(
                values[_MOVE_ORIGINATOR_AE_TITLE]
            )
        if _MOVE_ORIGINATOR_MESSAGE_ID in values:
            primitive.MoveOriginatorMessageID = _us(values[_MOVE_ORIGINATOR_MESSAGE_ID])
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID:
        return None
    # Received into a file, as pynetdicom does with STORE_RECV_CHUNKED_DATASET.
    primitive.DataSet = io.BytesIO()
    return primitive


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, explicit VR little endian (OB has a 4-byte length)."""
    tag = struct.pack("<HH", 0x0002, element)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def file_meta_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group pynetdicom writes."""
    version = str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii")
    if len(version) % 2:
        version += b" "
    elements = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _padded_uid(sop_class_uid))
        + _meta_element(0x0003, b"UI", _padded_uid(sop_instance_uid))
        + _meta_element(0x0010, b"UI", _padded_uid(transfer_syntax_uid))
        + _meta_element(0x0012, b"UI", _padded_uid(PYNETDICOM_IMPLEMENTATION_UID))
        + _meta_element(0x0013, b"SH", version)
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<L", len(elements)))
    return b"\0" * 128 + b"DICM" + group_length + elements


_serial = itertools.count()

#: Bytes gathered in memory before they are written out (a multiple of the
#: page size, so that every chunk after the first starts page-aligned).
STAGING_BYTES = 1 << 20
#: Offsets and lengths of direct (``O_DIRECT``) writes are multiples of this.
_DIRECT_ALIGNMENT = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_chunk_pool: ThreadPoolExecutor | None = None
_chunk_pool_lock = threading.Lock()

log = logging.getLogger("dicomnode.receive")


def _chunk_writer() -> ThreadPoolExecutor:
    """The threads that write data set chunks while the next one is received."""
    global _chunk_pool
    with _chunk_pool_lock:  # created on first use: safe across fork and spawn
        if _chunk_pool is None:
            _chunk_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dicomnode-chunk")
        return _chunk_pool


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (a write may take only part)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class StagingBuffers:
    """Two page-aligned buffers, reused for every data set of one association.

    Anonymous ``mmap`` memory is page-aligned, as direct I/O needs. One buffer
    fills from the network while the other is written to disk.
    """

    def __init__(self, size: int = STAGING_BYTES) -> None:
        self.buffers = (mmap.mmap(-1, size), mmap.mmap(-1, size))
        self.size = size

    def close(self) -> None:
        """Release the memory."""
        for buffer in self.buffers:
            # A view still held somewhere keeps it alive; it is freed with the view.
            with contextlib.suppress(BufferError):
                buffer.close()


class IncomingDataSet:
    """A C-STORE data set being received into a file in the incoming directory.

    The bytes gather in a staging buffer of :data:`STAGING_BYTES`. The first
    buffer-full (the file meta and the data set's header, or all of a
    CT-size instance) is written through the page cache, where the C-STORE
    handler reads the header back; the kernel is asked to start writing it
    to disk at once. Each further buffer-full of a large data set (a
    radiograph) is written with ``O_DIRECT`` by a helper thread while the
    next one is received: the disk gets it straight from the buffer, without
    a copy into the page cache. The end of the data set goes through the page
    cache again. The handler's ``fsync`` then makes all of it durable, as
    before. Where the file system refuses direct I/O, every write goes
    through the page cache.
    """

    def __init__(
        self,
        context_id: int,
        primitive: C_STORE,
        file: BinaryIO,
        path: Path,
        staging: StagingBuffers,
    ) -> None:
        self.context_id = context_id
        self.primitive = primitive
        self.file = file
        self.path = path
        self._staging = staging
        self._current = 0
        """Index of the buffer being filled."""
        self._filled = 0
        self._offset = 0
        """File offset where the buffer being filled starts."""
        self._direct_fd: int | None = None
        self._direct_tried = False
        self._in_flight: Future[None] | None = None
        self.size = 0
        """Bytes received so far, file meta included."""

    @classmethod
    def open(
        cls,
        directory: Path,
        context_id: int,
        primitive: C_STORE,
        transfer_syntax_uid: str,
        staging: StagingBuffers,
    ) -> IncomingDataSet:
        """Create the file and stage its file meta header."""
        path = directory / f"{os.getpid()}-{next(_serial)}.dcm.part"
        # Exclusive, private, unbuffered; its ``name`` is the path, which pynetdicom
        # deletes after the handler (it is gone by then, renamed into storage).
        handle = open(path, "xb", buffering=0, opener=_private)  # noqa: SIM115
        incoming = cls(context_id, primitive, handle, path, staging)
        incoming.write(
            file_meta_header(
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                transfer_syntax_uid,
            )
        )
        # The C-STORE handler finds the file where pynetdicom would have put it.
        primitive._dataset_path = path
        primitive._dataset_file = handle  # type: ignore[assignment]
        primitive._context_id = context_id
        return incoming

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; full buffers go to disk."""
        view = memoryview(data)
        size = self._staging.size
        while view:
            buffer = self._staging.buffers[self._current]
            count = min(len(view), size - self._filled)
            buffer[self._filled : self._filled + count] = view[:count]
            self._filled += count
            self.size += count
            view = view[count:]
            if self._filled == size:
                self._write_out_full()

    def receive(self, read_into: Callable[[memoryview], int], count: int) -> bool:
        """Append ``count`` bytes that ``read_into`` reads straight into the buffer.

        ``read_into(view)`` fills ``view`` and returns how many bytes it filled;
        fewer than asked means the connection ended, and this returns False.
        """
        size = self._staging.size
        while count:
            wanted = min(count, size - self._filled)
            view = memoryview(self._staging.buffers[self._current])
            try:
                got = read_into(view[self._filled : self._filled + wanted])
            finally:
                view.release()
            self._filled += got
            self.size += got
            count -= got
            if got < wanted:
                return False
            if self._filled == size:
                self._write_out_full()
        return True

    def _write_out_full(self) -> None:
        """The buffer being filled is full: write it, and fill the other one meanwhile."""
        buffer = memoryview(self._staging.buffers[self._current])
        direct = self._offset > 0 and self._open_direct()
        self._wait()
        if direct:
            assert self._direct_fd is not None
            self._in_flight = _chunk_writer().submit(
                self._write_direct, self._direct_fd, buffer, self._offset
            )
            self._current = 1 - self._current
        else:
            _pwrite_all(self.file.fileno(), buffer, self._offset)
            start_writeback(self.file.fileno())
        self._offset += self._staging.size
        self._filled = 0

    def _open_direct(self) -> bool:
        """A second descriptor of the file for direct I/O; False where there is none."""
        if not self._direct_tried:
            self._direct_tried = True
            if _O_DIRECT:
                try:
                    self._direct_fd = os.open(self.path, os.O_WRONLY | _O_DIRECT)
                except OSError as exc:
                    log.debug(
                        "no direct I/O in %s (%s): writing through the page cache",
                        self.path.parent,
                        exc,
                    )
        return self._direct_fd is not None

    def _write_direct(self, fd: int, data: memoryview, offset: int) -> None:
        """One aligned chunk with direct I/O; through the page cache if refused."""
        try:
            _pwrite_all(fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Some file systems accept O_DIRECT when opening and refuse the write.
            _pwrite_all(self.file.fileno(), data, offset)

    def _wait(self) -> None:
        """Wait for the chunk being written (its error, if any, is raised here)."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def finish(self) -> None:
        """Write what is left in the buffer; the file then holds the whole data set."""
        self._wait()
        rest = memoryview(self._staging.buffers[self._current])[: self._filled]
        aligned = len(rest) - len(rest) % _DIRECT_ALIGNMENT if self._offset > 0 else 0
        if aligned and self._open_direct():
            assert self._direct_fd is not None
            self._write_direct(self._direct_fd, rest[:aligned], self._offset)
        else:
            aligned = 0
        _pwrite_all(self.file.fileno(), rest[aligned:], self._offset + aligned)
        # The disk starts on it now, while the handler checks the header; its
        # fsync then mostly waits for writes already under way.
        start_writeback(self.file.fileno())
        self._filled = 0
        self._close_direct()

    def _close_direct(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def discard(self) -> None:
        """Close and delete the file (the association ended before the data set did)."""
        with contextlib.suppress(Exception):
            self._wait()
        self._close_direct()
        self.file.close()
        self.path.unlink(missing_ok=True)
