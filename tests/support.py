"""Helpers shared by the test suite: real peers (dcmtk, PostgreSQL), the node as a subprocess,
and generated DICOM instances.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: dcmtk storescu option that proposes exactly a file's transfer syntax (so nothing is converted).
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def shared_data(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test with a message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} is absent: this test needs the project's shared data beside the checkout "
            "(../shared/data); a fresh clone without it skips this test"
        )
    return path


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file below ``folder`` (by content: a DICM preamble or a parseable dataset)."""
    out = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() in {".csv", ".md", ".txt"}:
            continue
        out.append(path)
    return out


def dcmtk(tool: str) -> str:
    """Absolute path of a dcmtk program; skips when dcmtk is not installed.

    pynetdicom installs Python apps named ``storescu`` and ``echoscu`` too, so the
    Debian binaries are looked up by absolute path, not through ``PATH``.
    """
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder) / tool
        if candidate.exists():
            return str(candidate)
    pytest.skip(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def transfer_syntax_of(path: Path) -> str:
    """The transfer syntax a file is encoded in (implicit VR LE when it has no meta header)."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    ts = getattr(ds.file_meta, "TransferSyntaxUID", None) if ds.file_meta else None
    return str(ts) if ts else "1.2.840.10008.1.2"


def storescu(
    files: Iterable[Path],
    port: int,
    called_ae: str = "DICOMNODE",
    calling_ae: str = "STORESCU",
    timeout: float = 120,
) -> list[subprocess.CompletedProcess[str]]:
    """Send files with dcmtk storescu, one run per transfer syntax, proposing only that syntax."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[transfer_syntax_of(path)].append(path)
    runs = []
    env = dict(os.environ, TCP_NODELAY="1")
    for ts, paths in groups.items():
        option = STORESCU_TS_OPTION[ts]
        cmd = [dcmtk("storescu"), option, "-aet", calling_ae, "-aec", called_ae]
        cmd += ["127.0.0.1", str(port), *map(str, paths)]
        runs.append(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env))
    return runs


def pynetdicom_store(
    path: Path, port: int, called_ae: str = "DICOMNODE", calling_ae: str = "STORESCU"
) -> int:
    """Send a file's bytes exactly as they are (chunked), with the UIDs of its meta header.

    Returns the C-STORE status, or -1 when no association or response came.
    """
    from pynetdicom import AE, _config

    meta = dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if not assoc.is_established:
            return -1
        try:
            rsp = assoc.send_c_store(path)
            return int(rsp.Status) if "Status" in rsp else -1
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def make_instance(
    folder: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "CT",
    rows: int = 64,
    columns: int = 64,
    patient_name: str = "Test^Patient",
    patient_id: str = "TEST-PID-0001",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a small valid image instance (CT, CR or DX) and return its path."""
    sop_class = {
        "CT": "1.2.840.10008.5.1.4.1.1.2",
        "CR": "1.2.840.10008.5.1.4.1.1.1",
        "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    }[modality]
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = "20260101"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(abs(hash(ds.SOPInstanceUID)) % 2**32)
    ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta group (the dataset)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data  # no meta header: the whole file is the dataset
    # Group length (0002,0000) UL gives the size of the rest of the meta group.
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


#: ``receive.fast_path`` of the configurations :func:`write_config` writes (unless a test
#: sets it): the ``receive_path`` fixture (tests/conftest.py) runs a module on both paths.
RECEIVE_FAST_PATH = True


def write_config(folder: Path, port: int, **sections: dict[str, Any]) -> Path:
    """A node configuration for tests: loopback, a private data dir, short quiet periods.

    ``sections`` override or add keys per table, e.g. ``completion={"force_complete_s": 60}``.
    ``receive.fast_path`` is :data:`RECEIVE_FAST_PATH` unless given.
    """
    config: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "DICOMNODE", "port": port, "bind": "127.0.0.1", "data_dir": "data"},
        "database": {"url": ""},
        "storage": {"min_free_mb": 0},
        "receive": {
            "allow_unknown_callers": False,
            "shutdown_grace_s": 10,
            "fast_path": RECEIVE_FAST_PATH,
        },
        "completion": {"force_complete_s": 600, "check_interval_s": 0.2},
        "queue": {"poll_interval_s": 0.1, "heartbeat_interval_s": 0.5, "stalled_after_s": 3},
        "worker": {"processes": 0},
    }
    quiet = {"CR": 1.5, "DX": 1.5, "CT": 2.0, "default": 2.0}
    quiet.update(sections.pop("quiet_period_s", {}))
    arrays: dict[str, list[dict[str, Any]]] = {}
    for name, values in sections.items():
        if isinstance(values, list):
            arrays[name] = values
        else:
            config.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in config.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    lines.append("[completion.quiet_period_s]")
    lines += [f"{k} = {_toml(v)}" for k, v in quiet.items()]
    for title in ("STORESCU", "ECHOSCU"):
        lines += ["", "[[receive.callers]]", f'ae_title = "{title}"', 'host = "127.0.0.1"']
    for name, tables in arrays.items():
        for table in tables:
            lines += ["", f"[[{name}]]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write a configuration held as ``tomllib`` reads it: tables, arrays of tables
    (lists of dicts) and, inside a table, nested tables as inline tables."""
    lines: list[str] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for name, value in data.items():
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            arrays.append((name, value))
            continue
        lines.append(f"[{name}]")
        for key, item in value.items():
            if isinstance(item, list) and item and all(isinstance(v, dict) for v in item):
                arrays.append((f"{name}.{key}", item))
            else:
                lines.append(f"{key} = {_toml(item)}")
        lines.append("")
    for name, tables in arrays:
        for table in tables:
            lines += [f"[[{name}]]"] + [f"{k} = {_toml(v)}" for k, v in table.items()] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def is_complete(study: dict[str, Any]) -> bool:
    """Whether ``status --json`` shows the study past its quiet period (complete or later)."""
    return study["state"] != "receiving" and study["completed_at"] is not None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):  # an inline table, e.g. [ct] selection = { min_slices = 1 }
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@dataclass
class NodeProcess:
    """``dicomnode serve`` running as a real subprocess."""

    config: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.config.parent / "data"

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n===== start {self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.config.parent,
            env=node_env(self.env),
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            # The log line comes after the socket is bound and listening. (No TCP probe:
            # a connection that sends nothing would hold an association slot.)
            if "listening on" in self.log().rsplit("===== start", 1)[-1]:
                return
            time.sleep(0.1)
        raise AssertionError(f"node did not start within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the node and every process it started (no clean-up at all)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            for child in descendant_pids(self.proc.pid):
                os.kill(child, signal.SIGKILL)
            self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json", "--limit", "1000")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def studies(self) -> dict[str, dict[str, Any]]:
        return {s["study_instance_uid"]: s for s in self.status()["studies"]}

    def wait_for(self, predicate: Any, timeout: float, what: str) -> dict[str, dict[str, Any]]:
        """Poll ``status`` until ``predicate(studies)`` holds."""
        deadline = time.monotonic() + timeout
        studies: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            studies = self.studies()
            if predicate(studies):
                return studies
            time.sleep(0.3)
        summary = {
            uid: (s["state"], s["instances"], *([s["reason"]] if s.get("reason") else []))
            for uid, s in studies.items()
        }
        log_tail = "\n".join(self.log().splitlines()[-40:])
        raise AssertionError(
            f"timed out waiting for {what}; studies: {summary}\nnode log (tail):\n{log_tail}"
        )


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for node subprocesses: unbuffered, and the test fixtures importable."""
    tests_dir = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **(extra or {}))


def descendant_pids(pid: int) -> list[int]:
    """Descendant process IDs of ``pid`` (from /proc)."""
    out = []
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return out
    for child in map(int, text.split()):
        out.append(child)
        out += descendant_pids(child)
    return out


@contextlib.contextmanager
def running_node(tmp_path: Path, **sections: dict[str, Any]) -> Iterator[NodeProcess]:
    """Start the node with a test configuration; stop it (or kill it) at the end."""
    port = free_port()
    config = write_config(tmp_path, port, **sections)
    node = NodeProcess(config=config, port=port, log_path=tmp_path / "node.log")
    node.start()
    try:
        yield node
    finally:
        if node.proc is not None:
            try:
                node.stop()
            except subprocess.TimeoutExpired:
                node.kill()


def have(program: str) -> bool:
    return shutil.which(program) is not None


def pg_bin_dir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free loopback port (``initdb`` + ``pg_ctl``)."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            # initdb refuses to run as root; use the postgres account (Debian package) or nobody.
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    pwd.getpwnam(name)
                    self.user = name
                    break

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user:
            record = pwd.getpwnam(self.user)
            os.chown(self.root, record.pw_uid, record.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class OrthancServer:
    """Orthanc (Debian package) as the PACS: generated JSON config, loopback ports, REST checks."""

    BINARY = "/usr/sbin/Orthanc"
    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", **overrides: Any) -> None:
        if not Path(self.BINARY).exists():
            pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
        self.workdir = workdir
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        plugins = [self.DICOMWEB_PLUGIN] if Path(self.DICOMWEB_PLUGIN).exists() else []
        config: dict[str, Any] = {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": plugins,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        config.update(self.overrides)
        return config

    def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [self.BINARY, str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_text = (self.workdir / "orthanc.log").read_text()
                raise AssertionError(f"Orthanc exited: {log_text}")
            with contextlib.suppress(OSError):
                self.get("/system")
                return
            time.sleep(0.2)
        raise AssertionError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def download(self, instance_id: str, target: Path | None = None) -> Path:
        """The Part 10 file of one instance Orthanc holds, saved to ``target``
        (default: ``<workdir>/<instance_id>.dcm``)."""
        import urllib.request

        target = target or self.workdir / f"{instance_id}.dcm"
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            target.write_bytes(response.read())
        return target

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of everything Orthanc holds."""
        return [
            self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
            for i in self.get("/instances")
        ]


def dciodvfy(path: Path) -> tuple[list[str], str]:
    """dicom3tools' ``dciodvfy`` on ``path``: its ``Error`` lines and its whole output.

    Skips the calling test when dciodvfy is not installed."""
    import pytest

    program = Path("/usr/bin/dciodvfy")
    if not program.exists():
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
    run = subprocess.run([str(program), str(path)], capture_output=True, text=True, timeout=60)
    output = run.stderr + run.stdout
    return [line for line in output.splitlines() if line.startswith("Error")], output


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder.mkdir()

    def self_signed(name: str) -> None:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
                 cwd=folder)  # fmt: skip

    self_signed("ca")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    self_signed("stranger")
    return folder


def index_study(db: Any, completion: Any, when: Any = None, modality: str = "CR") -> str:
    """Index a one-instance study as the receiver would (no file); return its Study UID."""
    from dicomnode.db import utcnow
    from dicomnode.index import InstanceMeta, Provenance, record_instance

    uid = generate_uid()
    meta = InstanceMeta(
        StudyInstanceUID=uid,
        SeriesInstanceUID=generate_uid(),
        SOPInstanceUID=generate_uid(),
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        Modality=modality,
    )
    record_instance(db, meta, Provenance("TEST", "127.0.0.1", "x", 1), completion, when or utcnow())
    return uid


def queue_studies(db: Any, settings: Any, n: int) -> list[str]:
    """``n`` indexed, completed and queued one-instance studies; their Study UIDs."""
    from datetime import timedelta

    from dicomnode.completion import complete_due_studies
    from dicomnode.db import utcnow
    from dicomnode.queue import enqueue

    t0 = utcnow()
    uids = [index_study(db, settings.completion, t0) for _ in range(n)]
    complete_due_studies(
        db,
        t0 + timedelta(hours=24),
        on_complete=lambda s, study: enqueue(s, study, settings.queue, t0),
    )
    return uids


def synthetic_ct_series(
    sources: Iterable[Path],
    folder: Path,
    slices: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    spacing_mm: float = 1.25,
    series_description: str = "CHEST AXIAL",
    body_part: str = "CHEST",
) -> list[Path]:
    """A CT series of ``slices`` files made from real slices (cycled), with new UIDs.

    Each file is a copy of a source slice (its pixel data, Rescale and geometry tags)
    with the given Study and Series Instance UIDs, a new SOP Instance UID, Instance
    Number 1..n and Image Position (Patient) stepping ``spacing_mm`` along z (written in
    shuffled order, so that sorting is needed); pixel data and transfer syntax are kept
    (a JPEG 2000 source stays JPEG 2000). Patient identity is replaced. Nothing
    converted from the shared data is kept beyond the test (write under ``tmp_path``).
    """
    datasets = [dcmread(p) for p in sources]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(slices)
    paths = []
    for number in order:
        ds = datasets[int(number) % len(datasets)].copy()
        x, y = (float(v) for v in ds.ImagePositionPatient[:2])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if not ds.get("SOPClassUID"):  # the TotalSegmentator example files have none
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.InstanceNumber = int(number) + 1
        ds.ImagePositionPatient = [x, y, round(-float(number) * spacing_mm, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = spacing_mm
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = body_part
        ds.PatientName = "Synthetic^CT"
        ds.PatientID = "SYNTH-CT-0001"
        ds.AccessionNumber = ""
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "for"])
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def instance_inputs(paths: Iterable[Path]) -> tuple[Any, ...]:
    """``InstanceInput`` of files (their index tags), as the worker gives them to a pipeline."""
    from dicomnode.pipelines.types import InstanceInput

    out = []
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        out.append(
            InstanceInput(
                path=path,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                modality=ds.Modality,
                body_part_examined=ds.get("BodyPartExamined"),
                view_position=ds.get("ViewPosition"),
                image_type="\\".join(ds.get("ImageType", [])),
                rows=ds.Rows,
                columns=ds.Columns,
                series_description=ds.get("SeriesDescription"),
                # As the worker names it: relative to the data directory.
                relative_path=f"instances/{path.parent.name}/{path.name}",
            )
        )
    return tuple(out)


def p_data_tf(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU (PS3.8 9.3.5) with PDVs of (context ID, control header, bytes)."""
    items = b"".join(
        struct.pack(">LBB", len(data) + 2, context_id, control) + data
        for context_id, control, data in pdvs
    )
    return struct.pack(">BBL", 0x04, 0x00, len(items)) + items


def store_command(path: Path, message_id: int) -> bytes:
    """The C-STORE-RQ command set for a file, as pynetdicom encodes it."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    meta = dcmread(path, stop_before_pixels=True).file_meta
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    primitive.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\0\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


def spawned_pids(node_pid: int) -> list[int]:
    """The node's receiving and worker processes (not Python's resource tracker)."""
    found = []
    for pid in descendant_pids(node_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
            found.append(pid)
    return found


def process_running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
