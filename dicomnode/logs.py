"""Logging set-up shared by every dicomnode process.

By default nothing the node logs carries patient names or IDs: our own messages
name studies by UID only, and pynetdicom's identifier logging is switched off
(:func:`dicomnode.receive.server.configure_pynetdicom`). ``node.log_phi = true``
lets an admin debugging a site add PatientID to the receive log lines.
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


class _ExpectedRetracing(logging.Filter):
    """Drop TensorFlow's "triggered tf.function retracing" warning.

    Keras builds one predict function per model, so warming up the five or six models of
    a pipeline traces once per model: expected, not the repeated tracing the warning is
    about. It would otherwise alarm admins at every start.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


class _BusyTick(logging.Filter):
    """Drop APScheduler's "skipped: maximum number of running instances reached".

    The completion check runs every ``completion.check_interval_s`` with at most one run
    at a time; when a heavy ingest slows one run down, the next is skipped and the one
    after it catches up. Nothing is lost, so this is not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


class _PersonNameWarning(logging.Filter):
    """Drop library warnings that quote a person name (highdicom, pydicom's PN checks).

    Building a result object from a source whose PatientName has one component makes
    highdicom warn with the name in the message. Python warnings go through logging
    (``py.warnings``), so this keeps patient names out of the log like everything else.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "intended person name" not in message and "VR PN" not in message


def configure_logging(level: str = "INFO") -> None:
    """Send log records to standard error in one plain format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs each association at INFO; keep it to warnings unless debugging.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for noisy in ("pynetdicom", "alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(quiet)
    # Library warnings become log records, so the same format and filters apply.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_PersonNameWarning())
    if level != "DEBUG":
        logging.getLogger("tensorflow").addFilter(_ExpectedRetracing())
        logging.getLogger("apscheduler.scheduler").addFilter(_BusyTick())
