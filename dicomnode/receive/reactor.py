"""Faster association threads for the receiver.

pynetdicom's acceptor loop sleeps 1 ms before every look at its DIMSE message
queue, and its DUL thread sleeps 1 ms whenever it finds nothing to do. With one
instance per C-STORE that adds up to several milliseconds per instance on a
single association, which dominates the receive rate of CT-size instances.

:class:`EventDrivenAssociation` waits on the message queue itself (it wakes up
the moment a C-STORE request is complete) and the DUL thread polls with a
shorter delay. :class:`BulkReadSocket` reads each PDU with a few large
``recv_into`` calls instead of pynetdicom's loop of 4 KiB reads (2,500 Python
iterations for one 10 MB radiograph). Everything else is pynetdicom's own
machinery. The request handler below makes the association server build these
instead of the defaults.
"""

from __future__ import annotations

import logging
import queue

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger("dicomnode.receive")

#: How long the reactor blocks on the message queue before it checks for a
#: release, an abort or a network timeout. A message wakes it at once.
_QUEUE_WAIT_S = 0.005
#: DUL polling delay when idle (pynetdicom's default is 1 ms).
_DUL_LOOP_DELAY_S = 0.0002


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


class BulkReadSocket(AssociationSocket):
    """An association socket that reads a PDU in as few system calls as possible."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed the connection)."""
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], nr_bytes - received)  # type: ignore[union-attr]
            if count == 0:
                del view
                return buffer[:received]
            received += count
        del view
        return buffer


class EventDrivenRequestHandler(RequestHandler):
    """Builds :class:`EventDrivenAssociation` acceptors on :class:`BulkReadSocket` s."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = EventDrivenAssociation
        assoc.dul._run_loop_delay = _DUL_LOOP_DELAY_S
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc
