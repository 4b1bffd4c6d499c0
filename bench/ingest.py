#!/usr/bin/env python3
"""C-STORE ingest benchmark: dicomnode against dcmtk ``storescp`` and Orthanc.

Usage::

    python3 bench/ingest.py            # 600 CT-size (~0.5 MB) + 60 CXR-size (~10 MB) instances
    python3 bench/ingest.py --quick    # 60 CT-size + 8 CXR-size: a smoke run

What it does, all inside one temporary directory that is deleted at the end:

1. Generates the test data with pydicom: 512x512 16-bit CT Image Storage
   instances spread over a few studies and 2500x2000 16-bit DX (For Presentation)
   instances, explicit VR little endian, unique UIDs, random-ish pixels.
2. For every cell (data set x number of associations x receiver) it starts the
   receiver fresh with empty storage, sends every file with dcmtk
   ``/usr/bin/storescu`` (``-xe``: explicit VR little endian first, so nothing is
   converted) over one association or four parallel ones (four ``storescu``
   processes, files split in four), times it from the first ``storescu`` start
   to the last one's exit, verifies exit codes and the number of stored
   instances, and stops the receiver.
3. Prints a table of instances/s and MB/s (MB = 10^6 bytes), the node's ratio to
   each peer and the node's memory (RSS of the serve process and its children,
   sampled from ``/proc``), and writes the same tables to ``bench/RESULTS.md``
   under ``## ingest`` (other sections of that file are kept).

Receivers:

* dcmtk ``/usr/bin/storescp`` (``--fork``: one process per association,
  ``+B``: the data set is written as received, no re-encoding).
* Orthanc ``/usr/sbin/Orthanc`` with a generated configuration (SQLite index and
  storage in the temporary directory, no plugins, no authentication).
* ``dicomnode serve`` with ``receive.processes`` = 1, 2 and 4 (SQLite database,
  ``storage.min_free_mb = 0``, unknown callers allowed).

Every receiver accepts PDUs of 64 KiB (the node's default ``max_pdu_size``), so
the PDU size is the same for all. ``TCP_NODELAY=1`` is set in the environment of
``storescu``, ``storescp`` and Orthanc: dcmtk (which Orthanc embeds) only
disables Nagle's algorithm when it is set, and is about ten times slower
without it.

Note on durability: the node fsyncs every instance and its SQLite index
(``synchronous=FULL``) before answering; Orthanc syncs its storage area
(``SyncStorageArea``, default true) and its SQLite index; ``storescp`` never
fsyncs.

Only the standard library, numpy and pydicom are used; everything talks over
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from results import machine_description, write_section

# dcmtk and Orthanc: absolute paths on purpose. The storescu/storescp found on PATH
# may be pynetdicom's Python apps (pyenv shims), which are not what we compare with.
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")

HOST = "127.0.0.1"
CALLING_AE = "BENCHSCU"
NODE_AE = "DICOMNODE"
STORESCP_AE = "STORESCP"
ORTHANC_AE = "ORTHANC"
#: Max PDU every receiver accepts (the node's default receive.max_pdu_size).
MAX_PDU = 65536
MB = 1_000_000

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
SAMPLE_INTERVAL_S = 0.1

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
SECTION = "## ingest"


class BenchError(Exception):
    """A receiver did not start, a wait timed out, or a run could not be verified."""


# --------------------------------------------------------------------------- helpers


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk tools and Orthanc: ``TCP_NODELAY=1`` set."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (IPv4 and IPv6), from ``/proc/net/tcp*``.

    Nothing connects to the port (a probe would hold an association slot).
    """
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A = TCP_LISTEN
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    interval_s: float = 0.1,
) -> None:
    """Poll ``predicate`` until true; fail on timeout or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with code {proc.returncode}")
        time.sleep(interval_s)
    raise BenchError(f"{what}: not done after {timeout_s:.0f} s")


def http_get_json(url: str, timeout_s: float = 5.0) -> dict[str, object]:
    """GET ``url`` and decode its JSON object (loopback only)."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"refusing a non-loopback URL: {url}")
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        data = json.loads(response.read().decode())
    if not isinstance(data, dict):
        raise BenchError(f"{url}: expected a JSON object, got {data!r}")
    return data


def count_files(root: Path, pattern: str = "*") -> int:
    """Regular files under ``root`` matching ``pattern`` (recursively)."""
    if not root.is_dir():
        return 0
    return sum(1 for p in root.rglob(pattern) if p.is_file())


def log_problems(log: Path, match: Callable[[str], bool], limit: int = 5) -> list[str]:
    """Up to ``limit`` lines of ``log`` for which ``match`` is true, plus how many more."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [line.strip() for line in lines if match(line)]
    out = hits[:limit]
    if len(hits) > limit:
        out.append(f"... and {len(hits) - limit} more such line(s) in {log.name}")
    return out


def dcmtk_error(line: str) -> bool:
    """A dcmtk error or fatal log line (``E: ...``, ``F: ...``)."""
    return line.startswith(("E: ", "F: "))


def first_line(cmd: Sequence[str]) -> str:
    """The first non-empty output line of a short command (for version strings)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (done.stdout + done.stderr).splitlines():
        # dcmtk prints "$dcmtk: storescu v3.6.7 2022-04-22 $".
        text = line.strip().strip("$").strip().removeprefix("dcmtk:").strip()
        if text:
            return text
    return "unknown"


# --------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child process in its own session, logging to a file, stopped for sure."""

    def __init__(
        self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self._log_handle: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop() can reach its children
        )

    @property
    def pid(self) -> int:
        """Process id (also the id of its process group)."""
        return self.proc.pid

    def exited(self) -> bool:
        """Whether it has exited, without reaping it: its pid (and group id) stay reserved."""
        if self.proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, SIGKILL what is left of its process group.

        Returns the exit code, or None when it had to be killed. The group is
        signalled only while its leader is not yet reaped, so the id cannot have
        been reused by an unrelated process.
        """
        if self.proc.returncode is None:
            if not self.exited():
                os.kill(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while not self.exited() and time.monotonic() < deadline:
                time.sleep(0.05)
            graceful = self.exited()
            # Whatever is left of the group (storescp --fork children, a stuck receiver).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            code = self.proc.returncode if graceful else None
        else:
            code = self.proc.returncode
        self._log_handle.close()
        return code


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent ids in ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces or parentheses; fields follow the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Sum of the resident set sizes of ``root`` and its descendants, in bytes."""
    total = 0
    for pid in process_tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class MemoryStats:
    """The node's RSS (serve process + children) around one send, in bytes."""

    before: int
    peak: int
    after: int
    first_tenth: int
    """Mean RSS over the first tenth of the send."""
    last_tenth: int
    """Mean RSS over the last tenth of the send; compare with ``first_tenth`` for growth."""


class RssSampler:
    """Samples the RSS of a process tree in a background thread."""

    def __init__(self, root: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.root = root
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tree_rss(self.root)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def stats(self, t0: float, t1: float) -> MemoryStats | None:
        """Memory around the send that ran from ``t0`` to ``t1`` (monotonic seconds)."""
        before = [rss for t, rss in self.samples if t <= t0]
        during = [rss for t, rss in self.samples if t0 <= t <= t1]
        after = [rss for t, rss in self.samples if t >= t1]
        if not during:
            return None
        tenth = max(1, len(during) // 10)
        return MemoryStats(
            before=before[-1] if before else during[0],
            peak=max(during),
            after=after[-1] if after else during[-1],
            first_tenth=int(statistics.fmean(during[:tenth])),
            last_tenth=int(statistics.fmean(during[-tenth:])),
        )


# --------------------------------------------------------------------------- receivers


class Receiver:
    """A C-STORE SCP under test, started fresh with empty storage for one cell."""

    name = "?"
    ae_title = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: ManagedProcess | None = None
        self.exit_code: int | None = None

    def start(self) -> None:
        """Start it and wait until it accepts associations."""
        raise NotImplementedError

    def stored(self) -> int:
        """How many instances it has stored."""
        raise NotImplementedError

    def problems(self) -> list[str]:
        """Errors or warnings it logged (empty when clean)."""
        return []

    def stop(self) -> None:
        """Stop it (gracefully when possible)."""
        if self.process is not None:
            self.exit_code = self.process.stop()

    def early_stop_notes(self) -> list[str]:
        """Signs, checked before :meth:`stop`, that it stopped or was stopped on its own."""
        if self.process is not None and self.process.exited():
            return [f"{self.name} exited before the benchmark stopped it"]
        return []

    def _wait_listening(self, expected: int = 1) -> None:
        assert self.process is not None
        wait_until(
            lambda: listening_sockets(self.port) >= expected,
            START_TIMEOUT_S,
            f"{self.name} listening on port {self.port}",
            self.process.proc,
        )


class StorescpReceiver(Receiver):
    """dcmtk ``storescp``: one forked process per association, bit-preserving writes."""

    name = "storescp"
    ae_title = STORESCP_AE

    def start(self) -> None:
        self.out = self.workdir / "storage"
        self.out.mkdir()
        cmd = [
            str(STORESCP),
            "--fork",
            "-aet", self.ae_title,
            "-od", str(self.out),
            "+B",
            "-pdu", str(MAX_PDU),
            "-ta", "60",
            "-td", "120",
            str(self.port),
        ]  # fmt: skip
        self.process = ManagedProcess(self.name, cmd, self.workdir / "storescp.log", dcmtk_env())
        self._wait_listening()

    def stored(self) -> int:
        return count_files(self.out)

    def problems(self) -> list[str]:
        assert self.process is not None
        return log_problems(self.process.log, dcmtk_error)


class OrthancReceiver(Receiver):
    """Orthanc with a generated configuration, everything in the work directory."""

    name = "Orthanc"
    ae_title = ORTHANC_AE

    def start(self) -> None:
        self.http_port = free_port()
        config = {
            "Name": "dicomnode-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "OrthancPeers": {},
            "MaximumPduLength": MAX_PDU,
            "DicomScpTimeout": 60,
            "SaveJobs": False,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.process = ManagedProcess(
            self.name, [str(ORTHANC), str(config_path)], self.workdir / "orthanc.log", dcmtk_env()
        )
        self._wait_listening()
        wait_until(self._http_ready, START_TIMEOUT_S, "Orthanc HTTP API", self.process.proc)

    def _http_ready(self) -> bool:
        try:
            http_get_json(f"http://{HOST}:{self.http_port}/system", timeout_s=2)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return True

    def stored(self) -> int:
        stats = http_get_json(f"http://{HOST}:{self.http_port}/statistics", timeout_s=30)
        count = stats.get("CountInstances")
        if not isinstance(count, int):
            raise BenchError(f"Orthanc /statistics without CountInstances: {stats!r}")
        return count

    def problems(self) -> list[str]:
        assert self.process is not None
        # Orthanc's log lines start with a level letter and the date: "E1121 21:54:00.1 ...".
        return log_problems(self.process.log, lambda line: line[:1] == "E" and line[1:2].isdigit())


def dicomnode_command() -> list[str]:
    """How to run ``dicomnode``: the installed script, else this interpreter's module."""
    script = shutil.which("dicomnode")
    return [script] if script else [sys.executable, "-m", "dicomnode.cli"]


class NodeReceiver(Receiver):
    """``dicomnode serve`` with ``receive.processes`` receiver processes."""

    ae_title = NODE_AE

    def __init__(self, workdir: Path, processes: int) -> None:
        super().__init__(workdir)
        self.processes = processes
        self.name = f"node p={processes}"

    def start(self) -> None:
        self.data_dir = self.workdir / "data"
        self.config = self.workdir / "config.toml"
        self.config.write_text(
            "\n".join(
                [
                    "[node]",
                    f'ae_title = "{self.ae_title}"',
                    f"port = {self.port}",
                    f'bind = "{HOST}"',
                    f'data_dir = "{self.data_dir}"',
                    'log_level = "INFO"',
                    "",
                    "[storage]",
                    "min_free_mb = 0",
                    "",
                    "[receive]",
                    "allow_unknown_callers = true",
                    f"processes = {self.processes}",
                    f"max_pdu_size = {MAX_PDU}",
                    "shutdown_grace_s = 10",
                    "",
                ]
            )
        )
        cmd = [*dicomnode_command(), "serve", "--config", str(self.config)]
        self.process = ManagedProcess(self.name, cmd, self.workdir / "node.log")
        self._wait_listening()
        # The main process logs "listening on" once every receiving process and the
        # worker are ready; waiting for the worker too means that "memory before the
        # send" is the node at rest and not a worker still importing.
        for line in ("listening on", "started (pipeline"):
            wait_until(
                lambda line=line: line in self.process.log.read_text(errors="replace"),
                START_TIMEOUT_S,
                f"{self.name} log line {line!r}",
                self.process.proc,
            )

    def stored(self) -> int:
        return count_files(self.data_dir / "instances", "*.dcm")

    def indexed(self) -> int:
        """Instances the node's index knows, summed from ``dicomnode status --json``."""
        cmd = [
            *dicomnode_command(),
            "status", "--json", "--limit", "100000", "--config", str(self.config),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise BenchError(f"dicomnode status failed ({done.returncode}): {done.stderr[-500:]}")
        studies = json.loads(done.stdout)["studies"]
        return sum(int(s["instances"]) for s in studies)

    def early_stop_notes(self) -> list[str]:
        notes = super().early_stop_notes()
        if self.process is not None:
            # serve logs "received SIGTERM: stopping"; before our stop() nobody should send one.
            notes += [
                f"stop signal before the benchmark sent one: {line}"
                for line in log_problems(self.process.log, lambda line: "received SIG" in line)
            ]
        return notes

    def problems(self) -> list[str]:
        assert self.process is not None
        markers = (" ERROR ", " CRITICAL ", " WARNING ", "Traceback", "Error:")
        return log_problems(self.process.log, lambda line: any(m in line for m in markers))


RECEIVER_KEYS = ("storescp", "orthanc", "node1", "node2", "node4")


def make_receiver(key: str, workdir: Path) -> Receiver:
    """A new receiver of kind ``key`` (one of :data:`RECEIVER_KEYS`) in ``workdir``."""
    if key == "storescp":
        return StorescpReceiver(workdir)
    if key == "orthanc":
        return OrthancReceiver(workdir)
    if key.startswith("node") and key[4:].isdigit():
        return NodeReceiver(workdir, int(key[4:]))
    raise ValueError(key)


ROW_LABELS = {
    "storescp": "storescp",
    "orthanc": "Orthanc",
    "node1": "node p=1",
    "node2": "node p=2",
    "node4": "node p=4",
}


# --------------------------------------------------------------------------- test data


@dataclass(frozen=True)
class TestData:
    """One set of generated instances."""

    key: str
    label: str
    files: tuple[Path, ...]
    total_bytes: int

    @property
    def mean_mb(self) -> float:
        """Mean file size in MB."""
        return self.total_bytes / len(self.files) / MB


def _base_dataset(sop_class: str, study_uid: str, series_uid: str, modality: str) -> Dataset:
    ds = Dataset()
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "dicomnode-bench"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def _pixels(base: np.ndarray, index: int) -> bytes:
    """Random-ish, different for every instance, cheap: the base image rolled and xored."""
    return (np.roll(base, index * 97) ^ np.uint16(index & 0x0FFF)).tobytes()


def generate_ct(directory: Path, count: int, rng: np.random.Generator) -> TestData:
    """``count`` 512x512 16-bit CT Image Storage instances in a few studies."""
    directory.mkdir(parents=True)
    base = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
    n_studies = max(1, min(4, count // 30))
    per_study = -(-count // n_studies)
    files: list[Path] = []
    study_uid = series_uid = ""
    for i in range(count):
        slice_index = i % per_study
        if slice_index == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
            patient = f"BENCH-CT-{i // per_study:02d}"
        ds = _base_dataset(CTImageStorage, study_uid, series_uid, "CT")
        ds.PatientName = f"Bench^CT{i // per_study:02d}"
        ds.PatientID = patient
        ds.SeriesNumber = 1
        ds.InstanceNumber = slice_index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.SliceThickness = "1.0"
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = ["-180", "-180", f"{-slice_index:.1f}"]
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.Rows, ds.Columns = base.shape
        ds.PixelData = _pixels(base, i)
        path = directory / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    total = sum(p.stat().st_size for p in files)
    return TestData("ct", "CT-size", tuple(files), total)


def generate_cxr(directory: Path, count: int, rng: np.random.Generator) -> TestData:
    """``count`` 2500x2000 16-bit DX For Presentation instances, two views per study."""
    directory.mkdir(parents=True)
    base = rng.integers(0, 4096, size=(2500, 2000), dtype=np.uint16)
    files: list[Path] = []
    study_uid = ""
    for i in range(count):
        if i % 2 == 0:
            study_uid = generate_uid()
        ds = _base_dataset(DigitalXRayImageStorageForPresentation, study_uid, generate_uid(), "DX")
        ds.PatientName = f"Bench^CXR{i // 2:03d}"
        ds.PatientID = f"BENCH-CXR-{i // 2:03d}"
        ds.SeriesNumber = 1 + i % 2
        ds.InstanceNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ViewPosition = "PA" if i % 2 == 0 else "LL"
        ds.ImagerPixelSpacing = ["0.15", "0.15"]
        ds.PresentationLUTShape = "IDENTITY"
        ds.Rows, ds.Columns = base.shape
        ds.PixelData = _pixels(base, i)
        path = directory / f"cxr{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    total = sum(p.stat().st_size for p in files)
    return TestData("cxr", "CXR-size", tuple(files), total)


# --------------------------------------------------------------------------- one cell


@dataclass
class CellResult:
    """One receiver x data set x association count."""

    receiver: str
    data: str
    associations: int
    instances: int
    total_bytes: int
    seconds: float | None = None
    stored: int = 0
    indexed: int | None = None
    ok: bool = False
    notes: list[str] = field(default_factory=list)
    memory: MemoryStats | None = None

    @property
    def rate(self) -> float | None:
        """Instances per second, when the run succeeded."""
        return self.instances / self.seconds if self.ok and self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        """MB (10^6 bytes) per second, when the run succeeded."""
        return self.total_bytes / MB / self.seconds if self.ok and self.seconds else None


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` in ``parts`` contiguous chunks of (almost) equal length."""
    size, extra = divmod(len(files), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(files[start:end]))
        start = end
    return [chunk for chunk in out if chunk]


def send_timeout_s(data: TestData) -> float:
    """A generous bound on one send: 2 minutes plus one second per MB."""
    return 120.0 + data.total_bytes / MB


def send(
    receiver: Receiver, data: TestData, associations: int, logdir: Path
) -> tuple[float, list[str]]:
    """Send ``data`` over ``associations`` parallel storescu processes.

    Returns the elapsed seconds (first start to last exit) and problems seen
    (non-zero exit codes, storescu errors, timeouts).
    """
    problems: list[str] = []
    procs: list[ManagedProcess] = []
    timeout = send_timeout_s(data)
    t0 = time.perf_counter()
    for i, chunk in enumerate(split(data.files, associations)):
        cmd = [
            str(STORESCU),
            "-xe",
            "-aet", CALLING_AE,
            "-aec", receiver.ae_title,
            "-to", "30",
            "-ta", "60",
            "-td", "120",
            HOST, str(receiver.port),
            *map(str, chunk),
        ]  # fmt: skip
        procs.append(
            ManagedProcess(f"storescu-{i}", cmd, logdir / f"storescu-{i}.log", dcmtk_env())
        )
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            code = p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            problems.append(f"{p.name} still running after {timeout:.0f} s; killed")
            code = None
        if code not in (0, None):
            problems.append(f"{p.name} exited with code {code}")
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.stop(timeout_s=5)
        problems.extend(f"{p.name}: {line}" for line in log_problems(p.log, dcmtk_error, 3))
    return elapsed, problems


def run_cell(
    key: str, data: TestData, associations: int, root: Path, keep_logs: Path | None = None
) -> CellResult:
    """Start a fresh receiver, send, verify, stop it, delete its storage.

    With ``keep_logs``, the logs of a failed cell are copied there first.
    """
    label = ROW_LABELS[key]
    result = CellResult(label, data.label, associations, len(data.files), data.total_bytes)
    workdir = Path(tempfile.mkdtemp(prefix=f"{key}-{data.key}-{associations}-", dir=root))
    receiver = make_receiver(key, workdir)
    try:
        receiver.start()
        assert receiver.process is not None
        sampler = RssSampler(receiver.process.pid) if isinstance(receiver, NodeReceiver) else None
        with sampler if sampler is not None else contextlib.nullcontext():
            if sampler is not None:
                time.sleep(3 * SAMPLE_INTERVAL_S)  # a few samples before the send
            t0 = time.monotonic()
            result.seconds, problems = send(receiver, data, associations, workdir)
            t1 = time.monotonic()
            result.notes.extend(problems)
            result.stored = receiver.stored()
            if sampler is not None:
                time.sleep(3 * SAMPLE_INTERVAL_S)  # and a few after it
        if sampler is not None:
            result.memory = sampler.stats(t0, t1)
        if isinstance(receiver, NodeReceiver):
            result.indexed = receiver.indexed()
            if result.indexed != len(data.files):
                result.notes.append(
                    f"index has {result.indexed} instances, expected {len(data.files)}"
                )
        if result.stored != len(data.files):
            result.notes.append(f"stored {result.stored} of {len(data.files)} instances")
        result.ok = (
            not problems
            and result.stored == len(data.files)
            and (result.indexed is None or result.indexed == len(data.files))
        )
    except (BenchError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        result.notes.append(f"{type(exc).__name__}: {exc}")
    finally:
        early = receiver.early_stop_notes()
        receiver.stop()
        result.notes.extend(early)
        if early:
            result.ok = False
        if receiver.process is not None:
            result.notes.extend(f"log: {line}" for line in receiver.problems())
            if isinstance(receiver, NodeReceiver) and receiver.exit_code != 0:
                result.notes.append(f"serve exit code after SIGTERM: {receiver.exit_code}")
        if keep_logs is not None and not result.ok:
            target = keep_logs / workdir.name
            target.mkdir(parents=True, exist_ok=True)
            for log in workdir.glob("*.log"):
                shutil.copy2(log, target / log.name)
            result.notes.append(f"logs kept in {target}")
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- reporting


COLUMNS = [("ct", 1), ("ct", 4), ("cxr", 1), ("cxr", 4)]


def column_title(data: dict[str, TestData], key: str, associations: int) -> str:
    """Header of one column: data set, mean size, association count."""
    d = data[key]
    assoc = "1 assoc" if associations == 1 else f"{associations} assoc"
    return f"{d.label} ({len(d.files)} x {d.mean_mb:.1f} MB), {assoc}"


def aggregate(runs: list[CellResult]) -> CellResult:
    """The median of repeated runs of one cell (failed runs make the cell fail)."""
    if len(runs) == 1:
        return runs[0]
    failed = [r for r in runs if not r.ok]
    if failed:
        return failed[0]
    median = sorted(runs, key=lambda r: r.seconds or 0.0)[len(runs) // 2]
    return median


def cell_text(result: CellResult | None) -> str:
    """One table cell: rate and throughput, or why it failed."""
    if result is None:
        return "-"
    if not result.ok or result.rate is None or result.mb_per_s is None:
        return f"FAILED ({result.stored}/{result.instances} stored)"
    return f"{result.rate:.1f} inst/s, {result.mb_per_s:.1f} MB/s"


def ratio_text(node: CellResult | None, peer: CellResult | None) -> str:
    """node rate / peer rate as ``0.42x``."""
    if node is None or peer is None or node.rate is None or peer.rate is None:
        return "-"
    return f"{node.rate / peer.rate:.2f}x"


def mib(n: int) -> str:
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:.0f}"


def markdown_tables(
    results: dict[tuple[str, str, int], CellResult],
    data: dict[str, TestData],
    receivers: Sequence[str],
) -> list[str]:
    """Throughput, ratio and memory tables, as markdown lines."""
    titles = [column_title(data, k, a) for k, a in COLUMNS]
    lines = ["| receiver | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for key in receivers:
        cells = [cell_text(results.get((key, k, a))) for k, a in COLUMNS]
        lines.append(f"| {ROW_LABELS[key]} | " + " | ".join(cells) + " |")

    nodes = [k for k in receivers if k.startswith("node")]
    peers = [k for k in receivers if not k.startswith("node")]
    if nodes and peers:
        lines += ["", "Node rate / peer rate (instances/s; same data, so also MB/s):", ""]
        lines += ["| ratio | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
        for node in nodes:
            for peer in peers:
                cells = [
                    ratio_text(results.get((node, k, a)), results.get((peer, k, a)))
                    for k, a in COLUMNS
                ]
                lines.append(
                    f"| {ROW_LABELS[node]} / {ROW_LABELS[peer]} | " + " | ".join(cells) + " |"
                )

    if nodes:
        lines += [
            "",
            "Node memory: RSS of `dicomnode serve` and its children in MiB, "
            "before the send / peak during it / after it "
            "(mean of the first tenth of the send -> mean of the last tenth):",
            "",
            "| node | " + " | ".join(titles) + " |",
            "|---" * (len(titles) + 1) + "|",
        ]
        for node in nodes:
            cells = []
            for k, a in COLUMNS:
                r = results.get((node, k, a))
                m = r.memory if r is not None else None
                cells.append(
                    "-"
                    if m is None
                    else f"{mib(m.before)} / {mib(m.peak)} / {mib(m.after)} "
                    f"({mib(m.first_tenth)} -> {mib(m.last_tenth)})"
                )
            lines.append(f"| {ROW_LABELS[node]} | " + " | ".join(cells) + " |")
    return lines


def problems_lines(results: dict[tuple[str, str, int], CellResult]) -> list[str]:
    """Every note (failure, log error) of every cell, as markdown list items."""
    out = []
    for (key, data_key, assoc), r in results.items():
        for note in r.notes:
            out.append(f"- {ROW_LABELS[key]}, {data_key} {assoc} assoc: {note}")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick", action="store_true", help="60 CT-size and 8 CXR-size instances (smoke run)"
    )
    parser.add_argument("--ct", type=int, help="number of CT-size instances (default 600)")
    parser.add_argument("--cxr", type=int, help="number of CXR-size instances (default 60)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell; the median is reported (default 1)"
    )
    parser.add_argument(
        "--receivers",
        default=",".join(RECEIVER_KEYS),
        help=f"comma-separated subset of {','.join(RECEIVER_KEYS)} (default: all)",
    )
    parser.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help="markdown file to update"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update the results file")
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="parent of the temporary directory"
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy the receiver and storescu logs of failed cells to DIR (default: none kept)",
    )
    args = parser.parse_args(argv)
    args.ct = args.ct or (60 if args.quick else 600)
    args.cxr = args.cxr or (8 if args.quick else 60)
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = set(args.receivers) - set(RECEIVER_KEYS)
    if unknown:
        parser.error(f"unknown receiver(s): {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.ct < 1 or args.cxr < 1:
        parser.error("--repeat, --ct and --cxr must be at least 1")
    return args


def check_tools() -> None:
    """Fail early when dcmtk or Orthanc is missing."""
    missing = [str(p) for p in (STORESCU, STORESCP, ORTHANC) if not p.exists()]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (apt-get install dcmtk orthanc)")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C so every receiver is stopped and temp files removed."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0 when every cell succeeded, 1 otherwise."""
    args = parse_args(argv)
    check_tools()
    command = " ".join(
        ["python3", "bench/ingest.py", *(argv if argv is not None else sys.argv[1:])]
    )
    started = dt.datetime.now(dt.UTC)
    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=args.tmpdir))
    results: dict[tuple[str, str, int], CellResult] = {}
    try:
        with terminate_as_interrupt():
            rng = np.random.default_rng(20240101)
            t = time.perf_counter()
            data = {
                "ct": generate_ct(root / "data" / "ct", args.ct, rng),
                "cxr": generate_cxr(root / "data" / "cxr", args.cxr, rng),
            }
            print(
                f"generated {args.ct} CT-size ({data['ct'].mean_mb:.2f} MB each) and "
                f"{args.cxr} CXR-size ({data['cxr'].mean_mb:.2f} MB each) instances "
                f"in {time.perf_counter() - t:.1f} s",
                flush=True,
            )
            for data_key, assoc in COLUMNS:
                for key in args.receivers:
                    runs = []
                    for _ in range(args.repeat):
                        r = run_cell(key, data[data_key], assoc, root, args.keep_logs)
                        runs.append(r)
                        status = "ok" if r.ok else "FAILED"
                        print(
                            f"  {ROW_LABELS[key]:<9} {data[data_key].label:<8} {assoc} assoc: "
                            f"{cell_text(r)} in {r.seconds or 0:.2f} s [{status}]",
                            flush=True,
                        )
                        for note in r.notes:
                            print(f"      {note}", flush=True)
                    results[(key, data_key, assoc)] = aggregate(runs)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)

    tables = markdown_tables(results, data, args.receivers)
    problems = problems_lines(results)
    print()
    print("\n".join(tables))
    if problems:
        print("\nProblems:")
        print("\n".join(problems))

    if not args.no_write:
        versions = (
            f"{first_line([str(STORESCU), '--version'])}; "
            f"{first_line([str(ORTHANC), '--version'])}; "
            f"{first_line([*dicomnode_command(), '--version'])}"
        )
        section = [
            SECTION,
            "",
            f"- date: {started:%Y-%m-%d %H:%M} UTC",
            f"- machine: {machine_description()}",
            f"- command: `{command}`" + (" (quick smoke run)" if args.quick else ""),
            f"- versions: {versions}",
            f"- runs per cell: {args.repeat}" + (" (median)" if args.repeat > 1 else ""),
            "- sender: dcmtk `/usr/bin/storescu -xe`, 1 association or 4 parallel storescu "
            "processes (files split in 4); time from the first start to the last exit; "
            "`TCP_NODELAY=1` for storescu, storescp and Orthanc",
            f"- every receiver accepts {MAX_PDU}-byte PDUs; each is started fresh with empty "
            "storage per cell; storescp runs with `--fork +B` (no fsync), Orthanc with its "
            "defaults (SyncStorageArea), the node with SQLite and an fsync per instance",
            "- MB = 10^6 bytes",
            "",
            *tables,
        ]
        if problems:
            section += ["", "Problems seen:", "", *problems]
        write_section(args.results, SECTION, section)
        print(f"\nwrote the '{SECTION}' section of {args.results}")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        sys.exit(1)
