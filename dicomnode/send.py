"""The outbox sender: C-STORE SCU of result objects to every ``[[destinations]]`` entry.

Each outbox row (one object, one destination) is claimed with a lease
(:func:`dicomnode.queue.outbox.claim_deliveries`: its next attempt is pushed ``LEASE_S``
ahead in the same transaction, ``SKIP LOCKED`` on PostgreSQL), sent,
and recorded: Success and the warning statuses (0xB000, 0xB006,
0xB007: the PACS stored the object, perhaps coerced) count as delivered; a failure
status or an unreachable peer is retried with backoff until ``outbox.max_age_s``,
then the row is failed with its last status and error, visible in ``status``.
A sender that dies mid-send leaves the row due again when the lease ends: delivery
is at least once, and a PACS keeps one copy per SOP Instance UID.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import metrics
from dicomnode.config import DestinationSettings, Settings
from dicomnode.db import Database
from dicomnode.queue.outbox import Claimed, claim_deliveries, record_delivery
from dicomnode.storage import InstanceStore

log = logging.getLogger("dicomnode.send")

#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings.
DELIVERED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


def tls_args(destination: DestinationSettings) -> tuple[ssl.SSLContext, str | None] | None:
    """pynetdicom's ``tls_args`` for a destination with ``[destinations.tls]``, else None."""
    tls = destination.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.server_name is not None
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(certfile=tls.certificate, keyfile=tls.private_key)
    return context, tls.server_name


def _associate(ae: AE, destination: DestinationSettings) -> Any:
    return ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        # pynetdicom hands the server name to ssl, which takes None (no SNI check).
        tls_args=tls_args(destination),  # type: ignore[arg-type]
    )


def echo(destination: DestinationSettings, calling_ae_title: str, timeout_s: float = 30) -> str:
    """C-ECHO a destination; return a one-line outcome (raises nothing)."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    if not assoc.is_established:
        return _association_failure(assoc, destination)
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if "Status" in status else None
    finally:
        assoc.release()
    if code == 0x0000:
        return "success"
    return f"C-ECHO status {code:#06x}" if code is not None else "no C-ECHO response"


def _association_failure(assoc: Any, destination: DestinationSettings) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return (
            f"association rejected by {where} (result {rj.result}, source {rj.result_source}, "
            f"reason {rj.diagnostic})"
        )
    # pynetdicom reports a refused TCP connection as an abort too.
    return f"no association with {where}: unreachable, refused or aborted"


class Sender:
    """Sends due outbox rows, destination by destination, one association each."""

    def __init__(self, settings: Settings, db: Database, results: InstanceStore) -> None:
        self.settings = settings
        self.db = db
        self.results = results
        self.destinations = {d.name: d for d in settings.destinations}

    def send_due(self) -> int:
        """One pass over the due deliveries; returns how many were delivered."""
        claimed = claim_deliveries(self.db)
        by_destination: dict[str, list[Claimed]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        delivered = 0
        for name, items in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                for item in items:
                    self._record(item, False, None, f"destination {name!r} is not configured")
                continue
            delivered += self._send(destination, items)
        return delivered

    def _record(self, item: Claimed, ok: bool, status: int | None, error: str | None) -> None:
        outcome = record_delivery(
            self.db, item.id, self.settings.outbox, ok, status=status, error=error
        )
        metrics.delivery_attempt(item.destination, ok)
        if ok:
            log.info("delivered %s to %s", item.sop_instance_uid, item.destination)
        else:
            detail = error or (f"status {status:#06x}" if status is not None else "failed")
            log.warning(
                "delivery of %s to %s: %s (now %s)",
                item.sop_instance_uid,
                item.destination,
                detail,
                outcome,
            )

    def _send(self, destination: DestinationSettings, items: Sequence[Claimed]) -> int:
        ae = AE(ae_title=self.settings.node.ae_title)
        timeout = self.settings.receive.network_timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class in sorted({i.sop_class_uid for i in items}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = _associate(ae, destination)
        if not assoc.is_established:
            reason = _association_failure(assoc, destination)
            for item in items:
                self._record(item, False, None, reason)
            return 0
        delivered = 0
        attempted = 0
        try:
            for item in items:
                attempted += 1
                try:
                    dataset = dcmread(self.results.path_of(item.path))
                except OSError as exc:
                    self._record(item, False, None, f"result file unreadable: {exc}")
                    continue
                try:
                    response = assoc.send_c_store(dataset)
                except (RuntimeError, ValueError) as exc:
                    self._record(item, False, None, f"C-STORE not sent: {exc}")
                    continue
                status = int(response.Status) if "Status" in response else None
                if status in DELIVERED_STATUSES:
                    delivered += 1
                    self._record(item, True, status, None)
                elif status is None:
                    self._record(item, False, None, "no C-STORE response (timeout or abort)")
                else:
                    comment = response.get("ErrorComment", "")
                    self._record(
                        item, False, status, f"refused with status {status:#06x} {comment}"
                    )
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for item in items[attempted:]:
            self._record(item, False, None, "association ended before this object was sent")
        return delivered

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        """Send until ``stop`` is set; never lets an error end the loop."""
        while not stop.is_set():
            try:
                self.send_due()
            except Exception:
                log.exception("sender pass failed; retrying")
            stop.wait(interval_s)
