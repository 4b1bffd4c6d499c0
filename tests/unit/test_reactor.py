"""The receiver's faster association machinery, against pynetdicom's own behaviour."""

from __future__ import annotations

import os
import socket
import threading
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicomnode.receive.cstore import decode_c_store_rq, encode_c_store_rsp, file_meta_header
from dicomnode.receive.reactor import _READ_AHEAD, BulkReadSocket
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
    from dicomnode.receive.reactor import MessageQueue

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
