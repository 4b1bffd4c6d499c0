"""The receiver's faster association machinery, against pynetdicom's own behaviour."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicomnode.receive.reactor import _READ_AHEAD, BulkReadSocket, encode_c_store_rsp
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
