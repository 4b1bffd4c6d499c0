"""``dicomnode send``: files and folders reach the node as they are, whatever their transfer
syntax, with non-DICOM files skipped (exit 0 when every DICOM file was stored).

The node runs as a real subprocess; what it stored is read back from its index and its
instance files (the transfer syntax of each must be the one it was sent in).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from support import free_port, make_instance, node_env, running_node, shared_data

from dicomnode.db import Database, Instance

pytestmark = pytest.mark.integration

JPEG_BASELINE_CXR = (
    "dicom_cxr",
    "chest",
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
)


def _send(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "send", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=node_env(),
    )


def _compressed(folder: Path, syntax: str) -> Path:
    """A small CT instance compressed (losslessly) in ``syntax``."""
    path = make_instance(folder, modality="CT", rows=32, columns=32)
    ds = dcmread(path)
    ds.compress(syntax, np.asarray(ds.pixel_array), generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def _stored_syntaxes(data_dir: Path) -> dict[str, str]:
    db = Database(f"sqlite:///{data_dir / 'dicomnode.db'}")
    with db.read() as session:
        rows = session.query(Instance.sop_instance_uid, Instance.transfer_syntax_uid).all()
    db.dispose()
    return dict(rows)


@pytest.mark.timeout(180)
def test_send_a_folder_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    sent = [make_instance(folder / "a", modality="CR")]
    for syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        sent.append(_compressed(folder / "b", syntax))
    (folder / "b" / "notes.txt").write_text("not DICOM\n")
    (folder / "DICOMDIR-like.bin").write_bytes(b"\0" * 300)
    expected = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): str(
            dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
        for p in sent
    }
    with running_node(tmp_path / "node") as node:
        run = _send(node.config, str(folder))
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"{len(sent)} of {len(sent)} DICOM file(s) stored" in run.stdout
        assert "skipped" in run.stdout and "notes.txt" in run.stdout
        assert "DICOMDIR-like.bin" in run.stdout
        stored = _stored_syntaxes(node.data_dir)
    assert stored == expected, "each instance is stored in the transfer syntax it was sent in"


@pytest.mark.timeout(120)
def test_send_a_jpeg_baseline_radiograph_as_it_is(tmp_path: Path) -> None:
    source = shared_data(*JPEG_BASELINE_CXR)
    with running_node(tmp_path / "node") as node:
        run = _send(node.config, str(source))
        assert run.returncode == 0, run.stdout + run.stderr
        stored = _stored_syntaxes(node.data_dir)
    ds = dcmread(source, stop_before_pixels=True)
    assert stored == {str(ds.SOPInstanceUID): "1.2.840.10008.1.2.4.50"}


@pytest.mark.timeout(120)
def test_send_reports_a_refusal_and_an_unreachable_peer(tmp_path: Path) -> None:
    path = make_instance(tmp_path / "in", modality="CR")
    with running_node(tmp_path / "node") as node:
        refused = _send(node.config, "--aet", "STRANGER", str(path))
        assert refused.returncode == 1
        assert "association rejected" in refused.stderr
        assert "0 of 1 DICOM file(s) stored" in refused.stdout
    nowhere = _send(
        tmp_path / "absent.toml", "--to", f"127.0.0.1:{free_port()}", "--aec", "ANY", str(path)
    )
    assert nowhere.returncode == 1
    assert "no association with ANY@127.0.0.1" in nowhere.stderr
