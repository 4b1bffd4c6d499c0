"""The project's exceptions: one base class and a few subclasses.

Any stage may import this module; it imports nothing of the project.
"""

from __future__ import annotations


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
