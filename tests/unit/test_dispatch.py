"""The dispatcher that hands connections to the least busy receiving process."""

from __future__ import annotations

import logging
import multiprocessing
import socket
from collections.abc import Iterator

import pytest

from dicomnode.receive.dispatch import (
    AssociationDispatcher,
    PendingConnectionLimit,
    ReceiverChannel,
)


@pytest.fixture
def dispatcher() -> Iterator[AssociationDispatcher]:
    d = AssociationDispatcher(("127.0.0.1", 0), multiprocessing.get_context("spawn"))
    yield d
    d.stop()


def _take(channel: ReceiverChannel) -> socket.socket:
    """What a receiving process does: take the next connection from its channel."""
    channel.socket.settimeout(5)
    message, fds, _flags, _address = socket.recv_fds(channel.socket, 16, 1)
    assert message == b"\x01" and len(fds) == 1
    return socket.socket(fileno=fds[0])


def test_connections_go_to_the_least_busy_process(dispatcher: AssociationDispatcher) -> None:
    channels = [dispatcher.attach(i) for i in range(3)]
    pairs = [socket.socketpair() for _ in range(5)]
    chosen = [dispatcher.hand_over(ours) for ours, _ in pairs]
    # Three idle processes take one each, then the ties go round again.
    assert chosen == [0, 1, 2, 0, 1]
    assert dispatcher.in_progress() == {0: 2, 1: 2, 2: 1}
    # Process 0 finishes both of its associations: it is now the least busy.
    channels[0].ended.value += 2
    assert dispatcher.hand_over(socket.socketpair()[0]) == 0
    # The socket a process takes is the very connection the dispatcher was given.
    taken = _take(channels[1])
    pairs[1][1].sendall(b"ping")
    assert taken.recv(4) == b"ping"


def test_a_dead_process_is_skipped_and_can_be_attached_again(
    dispatcher: AssociationDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    channels = [dispatcher.attach(i) for i in range(2)]
    channels[0].close()  # the process died: its end of the channel is gone
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assert dispatcher.hand_over(socket.socketpair()[0]) == 1
    assert "receiving process 0 cannot take associations" in caplog.text
    assert set(dispatcher.in_progress()) == {1}
    # The supervisor restarts it with a new channel; it is idle, so it is chosen.
    fresh = dispatcher.attach(0)
    assert dispatcher.hand_over(socket.socketpair()[0]) == 0
    _take(fresh)


def test_without_a_live_process_the_connection_is_refused(
    dispatcher: AssociationDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher.attach(0).close()
    with caplog.at_level(logging.ERROR, logger="dicomnode.receive"):
        assert dispatcher.hand_over(socket.socketpair()[0]) is None
    assert "no receiving process is running" in caplog.text


def test_the_accepting_thread_hands_over_real_tcp_connections(
    dispatcher: AssociationDispatcher,
) -> None:
    channels = [dispatcher.attach(i) for i in range(2)]
    dispatcher.start()
    clients = [socket.create_connection(dispatcher.address, timeout=5) for _ in range(2)]
    taken = [_take(channel) for channel in channels]
    # Each process got one of the two connections, and each is live end to end.
    peers = sorted(t.getpeername() for t in taken)
    assert peers == sorted(c.getsockname() for c in clients)
    for client, server in zip(
        sorted(clients, key=lambda c: c.getsockname()),
        sorted(taken, key=lambda t: t.getpeername()),
        strict=True,
    ):
        client.sendall(b"A-ASSOCIATE")
        assert server.recv(11) == b"A-ASSOCIATE"
    dispatcher.stop()
    # Stopping closes the port and each process's channel (it then stops itself).
    with pytest.raises(OSError):
        socket.create_connection(dispatcher.address, timeout=5)
    assert channels[0].socket.recv(1) == b""


def test_a_connection_gone_before_its_association_counts_as_ended(
    dispatcher: AssociationDispatcher,
) -> None:
    """What the receiving process does with a handed-over socket that is already dead,
    and with a channel the dispatcher has closed."""
    from pynetdicom import AE

    from dicomnode.receive.dispatch import HandoffAssociationServer

    channel = dispatcher.attach(0)
    closed: list[bool] = []
    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(
        ("127.0.0.1", 0),
        server_class=HandoffAssociationServer,
        channel=channel,
        on_channel_closed=lambda: closed.append(True),
    )
    try:
        assert dispatcher.hand_over(socket.socket()) == 0  # never connected: no peer
        assert dispatcher.in_progress() == {0: 1}
        with pytest.raises(OSError):
            server.get_request()
        assert dispatcher.in_progress() == {0: 0}  # no association will ever end it
        dispatcher.stop()
        with pytest.raises(OSError, match="closed the channel"):
            server.get_request()
        assert closed == [True]
    finally:
        server.server_close()


def test_pending_connections_are_limited_per_peer_address() -> None:
    """Connections that have not sent their association request: at most
    ``max_pending_per_peer`` per address; released ones free their place (once)."""

    class Server(PendingConnectionLimit):
        pass

    server = Server(max_pending_per_peer=2)
    first, second, third, other = object(), object(), object(), object()
    assert server.verify_request(first, ("10.0.0.1", 1000))
    assert server.verify_request(second, ("10.0.0.1", 1001))
    assert not server.verify_request(third, ("10.0.0.1", 1002))
    assert server.verify_request(other, ("10.0.0.2", 1000))  # another address
    server.release_pending(first)
    server.release_pending(first)  # idempotent: the association and its DUL may both call
    assert server.pending_connections() == {"10.0.0.1": 1, "10.0.0.2": 1}
    assert server.verify_request(third, ("10.0.0.1", 1002))
    assert not server.verify_request(object(), ("10.0.0.1", 1003))
    for request in (second, third, other):
        server.release_pending(request)
    assert server.pending_connections() == {}
