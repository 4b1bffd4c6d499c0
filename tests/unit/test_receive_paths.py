"""The receive path switch and the stock path's socket-level guard (docs/receive.md).

The guard is tested on a real socket pair, read the way pynetdicom's
``AssociationSocket.recv`` reads (a 6-byte header, then the body in 4 KiB pieces).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from dicomnode.receive import fastpath
from dicomnode.receive.guard import COMMAND_SET_LIMIT, CONTROL_PDU_LIMIT, GuardedSocket


@pytest.mark.parametrize(
    ("version", "tested"),
    [("3.0.4", True), ("3.0.9", True), ("3.0.3", False), ("3.1.0", False), ("2.1", False)],
)
def test_untested_pynetdicom_versions_are_named(version: str, tested: bool) -> None:
    reason = fastpath.untested_reason(version)
    assert (reason is None) == tested
    if not tested:
        assert reason is not None and version in reason and ">=3.0.4,<3.1.0" in reason


def test_request_handler_follows_the_switch_and_the_installed_version(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dicomnode.receive.fastpath.reactor import EventDrivenRequestHandler

    assert fastpath.request_handler(False) is None
    assert fastpath.request_handler(True) is EventDrivenRequestHandler
    monkeypatch.setattr(fastpath.metadata, "version", lambda name: "3.1.0")
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assert fastpath.request_handler(True) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pynetdicom 3.1.0 is outside the tested range" in warnings[0].getMessage()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    node, peer = socket.socketpair()
    try:
        yield node, peer
    finally:
        node.close()
        peer.close()


def _guard(sock: socket.socket, ended: list[int], **limits: float) -> GuardedSocket:
    return GuardedSocket(
        sock,
        peer="127.0.0.1",
        max_pdu_size=int(limits.get("max_pdu_size", 65536)),
        acse_timeout_s=limits.get("acse_timeout_s", 5.0),
        network_timeout_s=limits.get("network_timeout_s", 5.0),
        on_ended=lambda: ended.append(1),
    )


def _read_pdu(guard: GuardedSocket) -> bytes:
    """One PDU, read as pynetdicom's DUL reads it; short when the connection ended."""

    def recv(count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            data = guard.recv(min(4096, count - len(out)))
            if not data:
                break
            out += data
        return bytes(out)

    header = recv(6)
    if len(header) < 6:
        return header
    return header + recv(struct.unpack(">BBL", header)[2])


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def _aborted(peer: socket.socket, reason: int) -> None:
    peer.settimeout(2)
    assert peer.recv(10) == struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


def test_pdus_within_the_limits_pass_unchanged(pair: tuple[socket.socket, socket.socket]) -> None:
    node, peer = pair
    ended: list[int] = []
    guard = _guard(node, ended)
    request = _pdu(0x01, b"r" * 300)
    data = _pdu(0x04, _pdv(1, 0x03, b"c" * 200) + _pdv(1, 0x00, b"d" * 60000))
    peer.sendall(request + data + _pdu(0x05, b"\0" * 4))
    assert _read_pdu(guard) == request
    assert _read_pdu(guard) == data
    assert _read_pdu(guard) == _pdu(0x05, b"\0" * 4)
    assert ended == []
    peer.close()
    assert _read_pdu(guard) == b""
    assert ended == [1]


def test_a_length_bomb_before_the_request_is_aborted_unread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    node, peer = pair
    ended: list[int] = []
    guard = _guard(node, ended)
    peer.sendall(struct.pack(">BBL", 0x01, 0, CONTROL_PDU_LIMIT + 1) + b"\0" * 4096)
    assert _read_pdu(guard) == b""  # to pynetdicom: the connection closed (Evt17)
    _aborted(peer, 0x06)
    assert ended == [1]
    assert guard.recv(4096) == b""  # nothing more is read from that peer


def test_p_data_over_max_pdu_size_is_aborted(pair: tuple[socket.socket, socket.socket]) -> None:
    node, peer = pair
    guard = _guard(node, [], max_pdu_size=16384)
    peer.sendall(_pdu(0x01, b"r" * 100) + struct.pack(">BBL", 0x04, 0, 16385))
    _read_pdu(guard)
    assert _read_pdu(guard) == b""
    _aborted(peer, 0x06)


def test_a_pdv_past_its_pdu_and_an_endless_command_set_are_aborted(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    node, peer = pair
    guard = _guard(node, [])
    peer.sendall(_pdu(0x01, b"r" * 100) + _pdu(0x04, struct.pack(">LBB", 10**9, 1, 1) + b"x"))
    _read_pdu(guard)
    assert len(_read_pdu(guard)) < 6 + 7
    _aborted(peer, 0x06)

    node2, peer2 = socket.socketpair()
    with node2, peer2:
        guard = _guard(node2, [])
        fragment = _pdu(0x04, _pdv(1, 0x01, b"\0" * 1000))
        peer2.sendall(_pdu(0x01, b"r" * 100))
        _read_pdu(guard)
        for _ in range(COMMAND_SET_LIMIT // 1000):
            peer2.sendall(fragment)
            assert _read_pdu(guard) == fragment
        peer2.sendall(fragment)
        assert len(_read_pdu(guard)) < len(fragment)
        _aborted(peer2, 0x05)


def test_a_trickled_pdu_is_cut_off_at_its_deadline(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    node, peer = pair
    ended: list[int] = []
    guard = _guard(node, ended, acse_timeout_s=5.0, network_timeout_s=0.5)
    peer.sendall(_pdu(0x01, b"r" * 100))
    _read_pdu(guard)
    pdu = _pdu(0x04, _pdv(1, 0x00, b"d" * 100))
    peer.sendall(pdu[:8])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        for index in range(8, len(pdu)):  # bounded: one byte per read, each well in time
            data = guard.recv(1)
            if not data:
                break
            peer.sendall(pdu[index : index + 1])
            time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 2.0, elapsed
    assert ended == [1]
    assert "a PDU was not complete within receive.network_timeout_s" in caplog.text
