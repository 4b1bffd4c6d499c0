"""The project's exceptions: one base class and a few subclasses.

Any stage may import this module; it imports nothing of the project.
"""

from __future__ import annotations

import errno


class DicomNodeError(Exception):
    """Base class of every error dicomnode raises on purpose."""


class ConfigError(DicomNodeError):
    """The configuration is invalid.

    ``problems`` holds one ``(key_path, message)`` pair per mistake, so that
    ``dicomnode config check`` can report all of them at once.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = [f"{path}: {message}" for path, message in self.problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


class InvalidUIDError(DicomNodeError, ValueError):
    """A UID is not a valid DICOM UID and must not be used to build a path."""


class StorageFullError(DicomNodeError):
    """Free disk space under the storage root is below the configured floor."""


class DatasetError(DicomNodeError):
    """A received dataset cannot be understood well enough to be stored and indexed.

    ``status`` is the DICOM C-STORE failure status to answer with.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(DicomNodeError):
    """A failure that may not happen again (an outage of something the job needs).

    Raise it (or wrap the cause in it) for conditions a later attempt can pass; the
    worker retries such a job with backoff. Every other exception fails the job at once.
    """


#: Exception classes retried wherever they are raised: outages and memory, not the data.
RETRYABLE: tuple[type[BaseException], ...] = (
    RetryableError,
    MemoryError,  # out of memory: another attempt may find it free
    ConnectionError,  # network: refused, reset, aborted
    TimeoutError,  # network or database timeouts (socket.timeout is TimeoutError)
)

#: Third-party families matched by module and class name, so that this module imports none
#: of them. Every error of the database libraries counts: the worker's database work is the
#: node's own (claims, heartbeats, results), so a failure there (a lost connection, a lock,
#: a race on a constraint) is about the database, not about the study's data.
_DATABASE_MODULES = {"sqlalchemy", "psycopg", "psycopg2", "sqlite3"}
_RETRYABLE_BY_NAME = {
    ("tensorflow", "ResourceExhaustedError"),
    ("torch", "OutOfMemoryError"),
}


def is_retryable(exc: BaseException) -> bool:
    """Whether a job that failed with ``exc`` is tried again (see :data:`RETRYABLE`).

    Every error raised by the database libraries is retryable. Deterministic failures (a
    corrupt image, an invalid UID, a bug, a bad model file)
    give the same result on every attempt, so they are not retried. JAX reports an
    accelerator out of memory as an ``XlaRuntimeError`` whose message starts with
    ``RESOURCE_EXHAUSTED``.
    """
    if isinstance(exc, (*RETRYABLE, StorageFullError)):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True  # the disk may be freed
    for cls in type(exc).__mro__:
        top = cls.__module__.partition(".")[0]
        if top in _DATABASE_MODULES or (top, cls.__name__) in _RETRYABLE_BY_NAME:
            return True
        if cls.__name__ == "XlaRuntimeError" and "RESOURCE_EXHAUSTED" in str(exc):
            return True
    return False
