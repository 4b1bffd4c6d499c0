"""``dicomnode send``: C-STORE DICOM files, as they are, to the node (or any SCP).

Each file is sent in its own transfer syntax: the association proposes, for each
SOP Class, exactly the transfer syntaxes the files have, and the bytes go out as
stored (nothing is decoded or converted, so JPEG, JPEG 2000, JPEG-LS, RLE and
deflated files arrive as they are). Folders are walked recursively; files that are
not DICOM Part 10 files are skipped with a message. The outcome is one line per
skipped or failed file and a summary; the exit code is 0 when every DICOM file was
stored (Success or a warning status).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config

from dicomnode.send import DELIVERED_STATUSES

log = logging.getLogger("dicomnode.send")

#: pynetdicom's (and the standard's) limit of presentation contexts per association.
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class DicomFile:
    """A file to send and the UIDs its File Meta Information gives."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendReport:
    """What happened to each file."""

    stored: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every DICOM file was stored (and there was at least one)."""
        return self.stored > 0 and not self.failed


def walk(paths: Iterable[Path]) -> Iterator[Path]:
    """Every file named, and every file below each folder named (sorted)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def inspect(path: Path) -> DicomFile | str:
    """The file's SOP Class and transfer syntax, or why it cannot be sent."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "not a DICOM file (no DICOM File Meta Information)"
    except (OSError, ValueError, EOFError) as exc:
        return f"unreadable: {exc}"
    meta = ds.file_meta
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    syntax = meta.get("TransferSyntaxUID")
    if not sop_class or not syntax:
        return "no SOP Class UID or Transfer Syntax UID in its File Meta Information"
    return DicomFile(path, str(sop_class), str(syntax))


def _batches(files: Sequence[DicomFile]) -> Iterator[list[DicomFile]]:
    """Files in groups whose (SOP Class, transfer syntax) pairs fit in one association."""
    batch: list[DicomFile] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        pair = (f.sop_class_uid, f.transfer_syntax_uid)
        if pair not in pairs and len(pairs) == _MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(f)
    if batch:
        yield batch


def _send_batch(
    files: list[DicomFile],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout_s: float,
    report: SendReport,
) -> None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files}):
        # One context per pair: an acceptor picks one transfer syntax per context.
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        reason = (
            "association rejected (is the calling AE title a known caller?)"
            if assoc.is_rejected
            else f"no association with {called_ae}@{host}:{port}"
        )
        report.failed += [(f.path, reason) for f in files]
        return
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for f in files:
            if (f.sop_class_uid, f.transfer_syntax_uid) not in accepted:
                report.failed.append(
                    (f.path, f"the peer does not accept this SOP Class in {f.transfer_syntax_uid}")
                )
                continue
            if not assoc.is_established:
                report.failed.append((f.path, "the association ended before this file"))
                continue
            response = assoc.send_c_store(f.path)
            status = int(response.Status) if "Status" in response else None
            if status in DELIVERED_STATUSES:
                report.stored += 1
            elif status is None:
                report.failed.append((f.path, "no C-STORE response (timeout or abort)"))
            else:
                comment = response.get("ErrorComment", "")
                report.failed.append((f.path, f"status {status:#06x} {comment}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout_s: float = 60,
    on_skip: Callable[[Path, str], None] | None = None,
) -> SendReport:
    """C-STORE every DICOM file under ``paths`` to ``called_ae`` at ``host:port``."""
    report = SendReport()
    files: list[DicomFile] = []
    for path in walk(paths):
        found = inspect(path)
        if isinstance(found, str):
            report.skipped.append((path, found))
            if on_skip is not None:
                on_skip(path, found)
        else:
            files.append(found)
    # Send the stored bytes as they are (no decoding, no re-encoding).
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for batch in _batches(files):
            _send_batch(batch, host, port, called_ae, calling_ae, timeout_s, report)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return report


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a pair; ValueError when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
