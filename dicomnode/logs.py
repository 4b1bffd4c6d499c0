"""Logging set-up shared by every dicomnode process.

By default nothing the node logs carries patient names or IDs: our own messages
name studies by UID only, and pynetdicom's identifier logging is switched off
(:func:`dicomnode.receive.server.configure_pynetdicom`). ``node.log_phi = true``
lets an admin debugging a site add PatientID to the receive log lines.
"""

from __future__ import annotations

import logging
import re
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"

#: Loggers that get one of the filters below.
_FILTERED = (
    "apscheduler.scheduler",
    "py.warnings",
    "pydicom",
    "pynetdicom.transport",
    "pynetdicom.acse",
)


class _NodeFilter(logging.Filter):
    """Base of the node's filters, so that a new set-up replaces those of the last one."""


class _BusyTick(_NodeFilter):
    """Drop APScheduler's "skipped: maximum number of running instances reached".

    The completion check runs every ``completion.check_interval_s`` with at most one run
    at a time; when a heavy ingest slows one run down, the next is skipped and the one
    after it catches up. Nothing is lost, so this is not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


class _QuotedValue(_NodeFilter):
    """Keep the values of data elements out of library warnings: they may be PHI.

    pydicom warns (through ``warnings`` and its ``pydicom`` logger) with the value when
    a data set holds one its VR forbids: "Invalid value for VR SH: 'ACC-1234'" for an
    over-long Accession Number, a Patient's Name or Birth Date likewise. Such records
    keep the VR and lose the value. highdicom's warning that a one-component
    PatientName may not be a person name quotes the name and says nothing else: it is
    dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "intended person name" in message:
            return False
        found = _INVALID_VALUE.search(message)
        if found:
            record.msg = f"Invalid value for VR {found.group(1)} (the value is not logged)"
            record.args = ()
        return True


class _OwnOutcome(_NodeFilter):
    """Drop pynetdicom's ERROR lines about an association this node asked for and did not get.

    When a destination is down, each delivery attempt made pynetdicom log
    "Association request failed: unable to connect to remote" and "TCP Initialisation
    Error: ..." (or "Association Rejected" / "Aborted"); the sender logs one line per
    attempt with the same outcome and what happens next, so these only double it.
    """

    _MESSAGES = (
        "Association request failed: unable to connect",
        "TCP Initialisation Error",
        "Association Rejected",
        "Association Aborted",
        "Result: ",
        "Reason: ",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._MESSAGES)


#: pydicom's message for a value its VR forbids (the value follows the colon).
_INVALID_VALUE = re.compile(r"Invalid value for VR (\w\w)")


def configure_logging(level: str = "INFO") -> None:
    """Send log records to standard error in one plain format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in _FILTERED:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _NodeFilter)]:
            logger.removeFilter(old)
    # pynetdicom logs each association at INFO, highdicom several lines per result object,
    # uvicorn each start: keep libraries to warnings unless debugging.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for noisy in ("pynetdicom", "alembic", "apscheduler", "highdicom", "uvicorn"):
        logging.getLogger(noisy).setLevel(quiet)
    # Library warnings become log records, so the same format and filters apply.
    logging.captureWarnings(True)
    for library in ("py.warnings", "pydicom"):
        logging.getLogger(library).addFilter(_QuotedValue())
    if level != "DEBUG":
        logging.getLogger("apscheduler.scheduler").addFilter(_BusyTick())
        for name in ("pynetdicom.transport", "pynetdicom.acse"):
            logging.getLogger(name).addFilter(_OwnOutcome())
