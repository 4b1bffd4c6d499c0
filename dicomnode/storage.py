"""Instance files on disk: validated UID paths, atomic durable writes, a free-space floor.

Layout: ``<instances_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
Every path component is a UID that passed :func:`validate_uid`, so nothing taken
from a dataset can point outside the storage root.

A file becomes visible under its final name only after its bytes and its
directory entry are on stable storage: write (or receive) into a temporary file
on the same file system, ``fsync`` it, ``rename`` it into place, ``fsync`` the
directory. A crash at any moment leaves either the old file, the new file, or a
stray temporary file that :meth:`InstanceStore.clean_incoming` removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import InvalidUIDError, StorageFullError

#: PS3.5 9.1: components of digits separated by '.', at most 64 characters.
#: Leading zeros are tolerated (real modalities send them); empty components are not.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64


def validate_uid(value: object, name: str = "UID") -> str:
    """Return ``value`` as a clean UID string or raise :class:`InvalidUIDError` quoting it.

    Trailing NUL or space padding (allowed on the wire) is removed first.
    """
    if not isinstance(value, str):
        raise InvalidUIDError(f"{name} must be a string, got {value!r}")
    uid = value.rstrip("\x00 ")
    if not uid:
        raise InvalidUIDError(f"{name} is empty")
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"{name} is longer than {UID_MAX_LENGTH} characters: {uid!r}")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(f"{name} is not a valid DICOM UID: {uid!r}")
    return uid


def fsync_directory(path: Path | str) -> None:
    """Flush a directory entry (a rename or a new file in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux ``sync_file_range(2)`` from the C library, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting.

    A hint only (Linux ``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``): it
    makes the later ``fsync`` of a large file short, and durability still
    comes from that ``fsync``. Elsewhere it does nothing.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_file(path: Path | str) -> int:
    """Flush a file's bytes to stable storage; return its size."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredFile:
    """Where an instance ended up: its path relative to the storage root and its size."""

    relative_path: str
    size_bytes: int


class InstanceStore:
    """The storage root for instance files.

    Parameters
    ----------
    root:
        Directory holding the instance tree.
    incoming:
        Directory for files being received; must be on the same file system as
        ``root`` so that the final rename is atomic.
    min_free_bytes:
        Free-space floor: below it, :meth:`check_free_space` raises.
    """

    def __init__(self, root: Path, incoming: Path, min_free_bytes: int) -> None:
        self.root = root
        self.incoming = incoming
        self.min_free_bytes = min_free_bytes
        self._root = str(root)
        self._known_dirs: set[str] = set()

    def prepare(self) -> None:
        """Create the directories (idempotent)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.host_incoming.mkdir(parents=True, exist_ok=True)

    @property
    def host_incoming(self) -> Path:
        """This host's private part of the incoming directory (storage may be shared)."""
        return self.incoming / socket.gethostname()

    def clean_incoming(self) -> int:
        """Remove stray temporary files left by a crash on this host; return how many."""
        removed = 0
        if self.host_incoming.is_dir():
            for entry in self.host_incoming.iterdir():
                if entry.is_file():
                    entry.unlink(missing_ok=True)
                    removed += 1
        return removed

    def free_bytes(self) -> int:
        """Free bytes on the file system holding the storage root."""
        return shutil.disk_usage(self.root).free

    def check_free_space(self) -> None:
        """Raise :class:`StorageFullError` when free space is below the floor."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise StorageFullError(
                f"free space {free // 2**20} MiB under {self.root} is below the floor of "
                f"{self.min_free_bytes // 2**20} MiB (storage.min_free_mb)"
            )

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """The path of an instance relative to the root, built from validated UIDs only."""
        parts = (
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_instance_uid, "SOPInstanceUID") + ".dcm",
        )
        return "/".join(parts)

    def path_of(self, relative_path: str) -> Path:
        """Absolute path of a stored instance; refuses anything that leaves the root."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidUIDError(f"stored path escapes the storage root: {relative_path!r}")
        return path

    def _ensure_dir(self, directory: str) -> None:
        """Create ``directory`` and make each new entry durable in its parent."""
        if directory in self._known_dirs:
            return
        missing = []
        d = Path(directory)
        while not d.exists():
            missing.append(d)
            d = d.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            fsync_directory(new.parent)
        self._known_dirs.add(directory)

    def new_temporary(self) -> tuple[int, Path]:
        """Open a new temporary file in this host's incoming directory."""
        fd, name = tempfile.mkstemp(dir=self.host_incoming, suffix=".part")
        return fd, Path(name)

    def commit(self, temporary: Path | str, relative_path: str) -> StoredFile:
        """Make ``temporary`` durable and move it to ``relative_path`` atomically.

        An existing file at that path (the same SOP Instance received again) is
        replaced in one step, never left half-written. Runs once per received
        instance, so it works on strings rather than ``Path`` objects.
        """
        final = f"{self._root}/{relative_path}"
        directory = final.rpartition("/")[0]
        size = fsync_file(temporary)
        self._ensure_dir(directory)
        os.replace(temporary, final)  # noqa: PTH105 (strings: this runs per instance)
        fsync_directory(directory)
        return StoredFile(relative_path=relative_path, size_bytes=size)

    def write(self, data: bytes, relative_path: str) -> StoredFile:
        """Write ``data`` durably to ``relative_path`` (temporary file, fsync, rename)."""
        fd, temporary = self.new_temporary()
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return self.commit(temporary, relative_path)
        finally:
            temporary.unlink(missing_ok=True)
