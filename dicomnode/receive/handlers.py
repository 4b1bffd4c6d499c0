"""One handler per pynetdicom event; dependencies arrive as bound handler arguments.

The C-STORE handler does no decoding and no inference: pynetdicom has already
written the received bytes to a temporary file (``STORE_RECV_CHUNKED_DATASET``);
the handler reads a few header tags, makes the file durable under its UID path,
indexes it, and only then answers Success.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pynetdicom.events import Event

from dicomnode import metrics
from dicomnode.config import ReceiveSettings, Settings
from dicomnode.db import Database, utcnow
from dicomnode.errors import DatasetError, StorageFullError
from dicomnode.index import Provenance, record_instance
from dicomnode.receive.meta import read_instance_meta
from dicomnode.receive.status import OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from dicomnode.storage import InstanceStore

log = logging.getLogger("dicomnode.receive")

# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognized (PS3.8 9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
# A-ASSOCIATE-RJ: rejected-permanent, service-user, called AE title not recognized.
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class ReceiveContext:
    """What the C-STORE handler needs."""

    settings: Settings
    db: Database
    store: InstanceStore


def _peer(event: Event) -> tuple[str, str]:
    """Calling AE title and IP address of the association's requestor."""
    requestor = event.assoc.requestor
    # requestor.ae_title is filled in only after EVT_REQUESTED; the A-ASSOCIATE-RQ has it.
    ae_title = requestor.primitive.calling_ae_title if requestor.primitive else requestor.ae_title
    return str(ae_title).strip(), str(requestor.address)


def caller_allowed(settings: ReceiveSettings, ae_title: str, host: str) -> bool:
    """Whether ``[receive]`` lets ``ae_title`` at ``host`` open an association."""
    if settings.allow_unknown_callers:
        return True
    return any(
        caller.ae_title == ae_title and (caller.host is None or caller.host == host)
        for caller in settings.callers
    )


def handle_requested(event: Event, settings: ReceiveSettings, node_ae_title: str) -> None:
    """EVT_REQUESTED: reject callers that ``[[receive.callers]]`` does not list, and
    (``receive.check_called_ae_title``) requests addressed to another AE title."""
    ae_title, host = _peer(event)
    primitive = event.assoc.requestor.primitive
    called = str(primitive.called_ae_title if primitive else "").strip()
    if settings.check_called_ae_title and called != node_ae_title.strip():
        log.warning(
            "rejected association from calling AE %r at %s: called AE title %r is not "
            "this node's (%r; receive.check_called_ae_title is true)",
            ae_title,
            host,
            called,
            node_ae_title,
        )
        event.assoc.acse.send_reject(*_REJECT_CALLED_AE)
        event.assoc.kill()
        return
    if not caller_allowed(settings, ae_title, host):
        log.warning(
            "rejected association from calling AE %r at %s: not in [[receive.callers]] "
            "and receive.allow_unknown_callers is false",
            ae_title,
            host,
        )
        event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
        metrics.association_rejected()
        # Wait until the A-ASSOCIATE-RJ is on the wire before the connection is closed
        # (what pynetdicom itself does after its own rejections).
        event.assoc.kill()


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification always succeeds while the node runs."""
    return SUCCESS


def handle_store(event: Event, ctx: ReceiveContext) -> int:
    """EVT_C_STORE: store durably, index, then answer."""
    request = event.request
    temporary = event.dataset_path
    ae_title, host = _peer(event)
    sop_instance = str(request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
    try:
        ctx.store.check_free_space()
        meta = read_instance_meta(
            temporary,
            affected_sop_class_uid=str(request.AffectedSOPClassUID),
            affected_sop_instance_uid=sop_instance,
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        relative = ctx.store.relative_path(
            meta.StudyInstanceUID, meta.SeriesInstanceUID, meta.SOPInstanceUID
        )
        stored = ctx.store.commit(temporary, relative)
        outcome = record_instance(
            ctx.db,
            meta,
            Provenance(ae_title, host, stored.relative_path, stored.size_bytes),
            ctx.settings.completion,
            utcnow(),
        )
    except StorageFullError as exc:
        log.error("refused C-STORE %s from %r: %s", sop_instance, ae_title, exc)
        return OUT_OF_RESOURCES
    except DatasetError as exc:
        log.warning("rejected C-STORE from %r with status 0x%04X: %s", ae_title, exc.status, exc)
        return exc.status
    except Exception:
        log.exception("C-STORE %s from %r failed", sop_instance, ae_title)
        return PROCESSING_FAILURE
    if outcome.superseded_path:
        ctx.store.path_of(outcome.superseded_path).unlink(missing_ok=True)
    log.debug(
        "stored %s (%d bytes, %s) study %s%s%s",
        meta.SOPInstanceUID,
        stored.size_bytes,
        meta.TransferSyntaxUID,
        meta.StudyInstanceUID,
        " (duplicate, replaced)" if outcome.duplicate else "",
        f" PatientID={meta.PatientID!r}" if ctx.settings.node.log_phi else "",
    )
    return SUCCESS
