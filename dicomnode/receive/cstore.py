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

import io
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE

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


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


@dataclass
class IncomingDataSet:
    """A C-STORE data set being received into a file in the incoming directory."""

    context_id: int
    primitive: C_STORE
    file: BinaryIO
    path: Path
    unsynced: int = 0
    """Bytes written since the last writeback hint."""

    @classmethod
    def open(
        cls, directory: Path, context_id: int, primitive: C_STORE, transfer_syntax_uid: str
    ) -> IncomingDataSet:
        """Create the file and write its file meta header."""
        path = directory / f"{os.getpid()}-{next(_serial)}.dcm.part"
        # Exclusive, private, unbuffered; its ``name`` is the path, which pynetdicom
        # deletes after the handler (it is gone by then, renamed into storage).
        handle = open(path, "xb", buffering=0, opener=_private)  # noqa: SIM115
        incoming = cls(context_id, primitive, handle, path)
        incoming.write(
            file_meta_header(
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                transfer_syntax_uid,
            )
        )
        # The C-STORE handler finds the file where pynetdicom would have put it.
        primitive._dataset_path = path
        primitive._dataset_file = handle
        primitive._context_id = context_id
        return incoming

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` in full (an unbuffered write may take only part)."""
        view = memoryview(data)
        while view:
            written = self.file.write(view)
            if written is None:  # pragma: no cover - blocking files always report
                raise OSError(f"write to {self.path} returned nothing")
            view = view[written:]
        self.unsynced += len(data)

    def discard(self) -> None:
        """Close and delete the file (the association ended before the data set did)."""
        self.file.close()
        self.path.unlink(missing_ok=True)
