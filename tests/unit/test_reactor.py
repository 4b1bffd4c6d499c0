"""The receiver's faster association machinery, against pynetdicom's own behaviour."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicomnode.receive.fastpath import cstore
from dicomnode.receive.fastpath.cstore import (
    IncomingDataSet,
    StagingBuffers,
    decode_c_store_rq,
    encode_c_store_rsp,
    file_meta_header,
)
from dicomnode.receive.fastpath.reactor import _READ_AHEAD, BulkReadSocket
from dicomnode.storage import _SYNC_FILE_RANGE, fsync_file, start_writeback


def _response(status: int, sop_class: str, sop_instance: str, message_id: int) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    return primitive


@pytest.mark.parametrize("status", [0x0000, 0x0107, 0xA700, 0xA900, 0xC000, 0xC211])
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),  # odd and even lengths: padding
        ("1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.8.498.123456789012345678901"),
    ],
)
def test_c_store_response_bytes_equal_pynetdicoms(
    status: int, sop_class: str, sop_instance: str
) -> None:
    primitive = _response(status, sop_class, sop_instance, message_id=65535)
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert encode_c_store_rsp(primitive) == encode(message.command_set, True, True)


def test_c_store_response_with_error_comment_is_left_to_pynetdicom() -> None:
    primitive = _response(0xC000, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", 1)
    primitive.ErrorComment = "cannot understand"
    assert encode_c_store_rsp(primitive) is None


@pytest.fixture
def connected() -> tuple[BulkReadSocket, socket.socket]:
    """A BulkReadSocket on one end of a socket pair, the raw other end for the test."""
    ours, theirs = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    sock = BulkReadSocket(assoc, client_socket=ours)
    yield sock, theirs
    ours.close()
    theirs.close()


def test_read_ahead_hands_out_exact_pieces_and_counts_as_ready(
    connected: tuple[BulkReadSocket, socket.socket],
) -> None:
    sock, peer = connected
    pieces = [os.urandom(n) for n in (6, 65536, 6, 17, 6, 4000)]
    peer.sendall(b"".join(pieces))
    assert sock.recv(6) == pieces[0]
    # Everything sent fits in one read ahead, so the rest is buffered and "ready".
    assert sock.buffered() == sum(map(len, pieces[1:]))
    assert sock.ready
    for piece in pieces[1:]:
        assert sock.recv(len(piece)) == piece
    assert sock.buffered() == 0
    assert not sock.ready  # nothing buffered, nothing on the wire


def test_read_larger_than_read_ahead_while_the_peer_is_still_sending(
    connected: tuple[BulkReadSocket, socket.socket],
) -> None:
    sock, peer = connected
    big = os.urandom(3 * _READ_AHEAD + 123)
    tail = os.urandom(10)
    sender = threading.Thread(target=peer.sendall, args=(big + tail,))
    sender.start()
    assert sock.recv(len(big)) == big
    assert sock.recv(len(tail)) == tail
    sender.join(10)


def test_short_read_when_the_peer_closes(connected: tuple[BulkReadSocket, socket.socket]) -> None:
    sock, peer = connected
    peer.sendall(b"abc")
    peer.shutdown(socket.SHUT_WR)
    assert sock.recv(6) == b"abc"


def test_a_trickling_peer_cannot_extend_a_reads_deadline(
    connected: tuple[BulkReadSocket, socket.socket],
) -> None:
    """One byte every 0.1 s would reset a per-read timeout for ever; the deadline holds
    for the whole read, on both read paths (into a new buffer, and into a given view)."""
    sock, peer = connected
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                peer.send(b"x")

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        buffer = memoryview(bytearray(1000))
        for read in (lambda: sock.recv(1000), lambda: sock.recv_into_exact(buffer)):
            sock.deadline = time.monotonic() + 0.5
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                read()
            assert time.monotonic() - started < 0.5 + 0.3
    finally:
        stop.set()
        sender.join(5)
    sock.deadline = None


def test_writeback_hint_is_available_on_linux_and_harmless(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * 2**20)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        start_writeback(handle.fileno())
    if os.uname().sysname == "Linux":
        assert _SYNC_FILE_RANGE is not None
    assert fsync_file(path) == len(data)
    assert path.read_bytes() == data


_SOP_CLASS, _SOP_INSTANCE, _SYNTAX = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.44", "1.2.840.10008.1.2.1"
#: A small staging buffer, so that a few hundred KiB make several chunks.
_CHUNK = 16 * 4096


def _open_incoming(directory: Path, staging: StagingBuffers) -> IncomingDataSet:
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = _SOP_CLASS
    primitive.AffectedSOPInstanceUID = _SOP_INSTANCE
    return IncomingDataSet.open(directory, 1, primitive, _SYNTAX, staging)


def _direct_io_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    finally:
        probe.unlink()
    return hasattr(os, "O_DIRECT")


def _feed(incoming: IncomingDataSet, data: bytes) -> None:
    """Pieces of awkward sizes, alternately copied in and read straight into the buffer."""
    sizes = [1, 999, 70_000, 4096, 33_333, _CHUNK]
    offset = 0
    for i in range(len(data)):
        piece = data[offset : offset + sizes[i % len(sizes)]]
        if not piece:
            break
        if i % 2:
            incoming.write(piece)
        else:
            source = BytesIO(piece)
            assert incoming.receive(source.readinto, len(piece))
        offset += len(piece)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache-only"])
def test_a_staged_data_set_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Chunks after the first go to disk with O_DIRECT where the file system allows it;
    the file holds exactly the file meta header and the data set either way."""
    if not direct:
        monkeypatch.setattr(cstore, "_O_DIRECT", 0)
    direct_chunks = []
    write_direct = IncomingDataSet._write_direct

    def counted(self: IncomingDataSet, fd: int, data: memoryview, offset: int) -> None:
        direct_chunks.append((offset, len(data)))
        write_direct(self, fd, data, offset)

    monkeypatch.setattr(IncomingDataSet, "_write_direct", counted)
    staging = StagingBuffers(_CHUNK)
    data = os.urandom(5 * _CHUNK + 12_345)
    for _ in range(2):  # the buffers serve one data set after another
        incoming = _open_incoming(tmp_path, staging)
        _feed(incoming, data)
        incoming.finish()
        incoming.file.close()
        header = file_meta_header(_SOP_CLASS, _SOP_INSTANCE, _SYNTAX)
        assert incoming.path.read_bytes() == header + data
        assert incoming.size == len(header) + len(data)
        incoming.path.unlink()
    if direct and _direct_io_works(tmp_path):
        # Per data set: 4 full chunks after the first, then the aligned part of the rest.
        assert len(direct_chunks) == 10
        assert all(offset % 4096 == 0 and size % 4096 == 0 for offset, size in direct_chunks)
        assert min(offset for offset, _ in direct_chunks) == _CHUNK
    else:
        assert direct_chunks == []
    staging.close()


def _failing_direct_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> list[int]:
    """Make every write to a descriptor opened with O_DIRECT fail with ``code``."""
    direct_fds: list[int] = []
    real_open, real_pwrite = os.open, os.pwrite

    def open_(path: object, flags: int, *args: object) -> int:
        fd = real_open(path, flags, *args)  # type: ignore[arg-type]
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.append(fd)
        return fd

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd in direct_fds:
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(cstore.os, "open", open_)
    monkeypatch.setattr(cstore.os, "pwrite", pwrite)
    return direct_fds


def test_a_refused_direct_write_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path} does not allow O_DIRECT")
    direct_fds = _failing_direct_writes(monkeypatch, errno.EINVAL)
    staging = StagingBuffers(_CHUNK)
    incoming = _open_incoming(tmp_path, staging)
    data = os.urandom(3 * _CHUNK + 100)
    _feed(incoming, data)
    incoming.finish()
    assert direct_fds, "no direct write was tried"
    header = file_meta_header(_SOP_CLASS, _SOP_INSTANCE, _SYNTAX)
    assert incoming.path.read_bytes() == header + data


def test_a_failed_chunk_write_is_raised_and_the_file_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_io_works(tmp_path):
        pytest.skip(f"{tmp_path} does not allow O_DIRECT")
    _failing_direct_writes(monkeypatch, errno.ENOSPC)
    staging = StagingBuffers(_CHUNK)
    incoming = _open_incoming(tmp_path, staging)
    with pytest.raises(OSError, match="No space left"):
        _feed(incoming, os.urandom(4 * _CHUNK))
        incoming.finish()
    incoming.discard()
    assert not incoming.path.exists()
    staging.close()


def test_a_short_read_into_the_buffer_reports_the_end(tmp_path: Path) -> None:
    staging = StagingBuffers(_CHUNK)
    incoming = _open_incoming(tmp_path, staging)
    source = BytesIO(b"x" * 1000)
    assert not incoming.receive(source.readinto, 5000)
    incoming.discard()
    assert not incoming.path.exists()


def _encoded_request(**values: object) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it."""
    from pynetdicom.dimse_messages import C_STORE_RQ

    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    primitive.Priority = 2
    primitive.DataSet = BytesIO(b"\0" * 8)
    for keyword, value in values.items():
        setattr(primitive, keyword, value)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize(
    "extra",
    [{}, {"MoveOriginatorApplicationEntityTitle": "MOVESCU", "MoveOriginatorMessageID": 3}],
)
def test_c_store_request_decodes_as_pynetdicom_decodes_it(extra: dict[str, object]) -> None:
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.pdu_primitives import P_DATA

    command = _encoded_request(**extra)
    ours = decode_c_store_rq(command)
    assert ours is not None
    # pynetdicom's own decoder, fed the same command set as one last-fragment PDV.
    p_data = P_DATA()
    p_data.presentation_data_value_list = [[1, b"\x03" + command]]
    message = DIMSEMessage()
    message.decode_msg(p_data)
    theirs = message.message_to_primitive()
    for keyword in (
        "MessageID",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "Priority",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    ):
        assert getattr(ours, keyword) == getattr(theirs, keyword), keyword
    assert ours.is_valid_request


def test_commands_other_than_a_plain_c_store_request_are_left_to_pynetdicom() -> None:
    command = _encoded_request()
    assert decode_c_store_rq(command[:-3]) is None  # truncated
    assert decode_c_store_rq(command + b"\x00\x00\x02\x09\x00\x00\x00\x00") is None  # 0000,0902
    echo = bytearray(command)
    # CommandField (0000,0100) of a C-ECHO-RQ: 0x0030.
    at = echo.index(b"\x00\x00\x00\x01\x02\x00\x00\x00") + 8
    echo[at : at + 2] = b"\x30\x00"
    assert decode_c_store_rq(bytes(echo)) is None


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"])
def test_file_meta_header_equals_pydicoms(syntax: str) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.44"
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(
        buffer,  # type: ignore[arg-type]
        create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    assert file_meta_header(sop_class, sop_instance, syntax) == buffer.getvalue()


def test_message_queue_lets_the_dul_serve_only_when_the_association_is_idle() -> None:
    from dicomnode.receive.fastpath.reactor import MessageQueue

    messages = MessageQueue()
    assert messages.claim()  # idle: the DUL thread may serve a C-STORE itself
    assert not messages.claim()  # ... and nobody else may until it has answered
    messages.served()
    messages.put((1, "C-ECHO-RQ"))
    assert not messages.claim()  # a queued message must be answered first
    assert messages.get_nowait() == (1, "C-ECHO-RQ")
    assert not messages.claim()  # taken but not yet answered: still in service
    messages.served()
    assert messages.claim()
