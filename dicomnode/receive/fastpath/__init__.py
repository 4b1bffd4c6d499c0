"""The receive fast path: everything of the node that depends on pynetdicom's internals.

``receive.fast_path = true`` (the default) serves each association with the
classes of :mod:`~dicomnode.receive.fastpath.reactor` (an event-driven
association and DUL, C-STORE data sets read from the socket straight into their
file by :mod:`~dicomnode.receive.fastpath.cstore`, PDU length limits and
per-PDU deadlines; docs/receive.md, docs/security.md). ``false``, or a
pynetdicom outside :data:`TESTED_PYNETDICOM`, serves it with pynetdicom's stock
association, DUL and DIMSE code (:mod:`dicomnode.receive.server`); nothing
outside this package touches pynetdicom's private names.

The one interface: :func:`request_handler` gives the request handler class for
``AE.make_server`` or None (stock path, with one WARNING line saying why).

Tested with pynetdicom 3.0.4 (``pyproject.toml`` pins ``>=3.0.4,<3.1``). The
internals relied on, all of them pynetdicom 3.0's:

* ``transport.RequestHandler._create_association`` (overridden: the acceptor is
  built by pynetdicom, then its classes are swapped by assigning ``__class__``);
  ``transport.AssociationSocket`` (``socket``, ``ready``, ``recv``, ``send``,
  ``close``, ``_is_connected``).
* ``association.Association``: ``run_reactor``/``_run_reactor`` (overridden),
  ``_target`` (re-bound with ``utils.make_target``), ``_serve_request``,
  ``_accepted_cx``, ``_server``, ``_kill``, ``_is_paused``,
  ``_reactor_checkpoint``, ``_dul_ready``, ``dimse``, ``acse``, ``dul``.
* ``dul.DULServiceProvider``: ``run_reactor``, ``_read_pdu_data``,
  ``receive_pdu``, ``send_pdu``, ``kill_dul`` (overridden); ``event_queue``,
  ``state_machine``, ``artim_timer``, ``_idle_timer``, ``_recv_pdu``,
  ``_kill_thread``, ``_decode_pdu``, ``_process_recv_primitive``,
  ``_is_transport_event``, ``to_provider_queue``.
* ``dimse.DIMSEServiceProvider``: ``send_msg`` (overridden), ``msg_queue`` (a
  ``queue.Queue`` whose ``_get`` is overridden), ``message`` and its
  ``_data_set_file``/``_data_set_path``, ``maximum_pdu_size``.
* ``dimse_primitives.C_STORE``: ``_dataset_path``, ``_dataset_file``,
  ``_context_id`` (where the stored file is handed to the Storage SCP);
  ``pdu.A_ABORT_RQ``, ``pdu_primitives.P_DATA``, ``_config.STORE_RECV_CHUNKED_DATASET``.
"""

from __future__ import annotations

import logging
from importlib import metadata

log = logging.getLogger("dicomnode.receive")

#: The pynetdicom versions the fast path was tested with: from (inclusive), below (exclusive).
TESTED_PYNETDICOM = ((3, 0, 4), (3, 1, 0))


def _version(text: str) -> tuple[int, ...] | None:
    """``"3.0.4"`` as ``(3, 0, 4)``; None for anything not three numbers first."""
    parts = text.split(".")[:3]
    try:
        numbers = tuple(int(part) for part in parts)
    except ValueError:
        return None
    return numbers if len(numbers) == 3 else None


def untested_reason(installed: str | None = None) -> str | None:
    """Why the fast path must not run with pynetdicom ``installed`` (default: the
    installed one); None when that version is in :data:`TESTED_PYNETDICOM`."""
    if installed is None:
        try:
            installed = metadata.version("pynetdicom")
        except metadata.PackageNotFoundError:
            return "pynetdicom is not installed"
    version = _version(installed)
    low, high = TESTED_PYNETDICOM
    if version is None or not low <= version < high:
        return (
            f"pynetdicom {installed} is outside the tested range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        )
    return None


def request_handler(enabled: bool) -> type | None:
    """The fast path's request handler class, or None for pynetdicom's stock one.

    None when ``enabled`` (``receive.fast_path``) is false, or when the
    installed pynetdicom is not a tested version: then one WARNING line says
    that the node falls back to the stock path.
    """
    if not enabled:
        return None
    reason = untested_reason()
    if reason is not None:
        log.warning("receive fast path off: %s; receiving with pynetdicom's stock code", reason)
        return None
    from dicomnode.receive.fastpath.reactor import EventDrivenRequestHandler

    return EventDrivenRequestHandler
