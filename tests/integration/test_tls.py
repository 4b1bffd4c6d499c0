"""DICOM over TLS, checked with dcmtk's TLS-enabled echoscu and storescu."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from support import dcmtk, make_instance, make_pki, running_node

pytestmark = pytest.mark.integration


def _echo(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), *tls, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_tls_with_client_certificates(tmp_path: Path, processes: int) -> None:
    """With 2 processes, the TLS handshake happens in the receiving process the
    connection was handed to, after refused handshakes on the same processes."""
    pki = make_pki(tmp_path / "pki")
    tls = {
        "certificate": str(pki / "server.crt"),
        "private_key": str(pki / "server.key"),
        "ca_certificates": str(pki / "ca.crt"),
    }
    with running_node(
        tmp_path / "node", receive={"processes": processes}, **{"receive.tls": tls}
    ) as node:
        client = [
            "+tls",
            str(pki / "client.key"),
            str(pki / "client.crt"),
            "+cf",
            str(pki / "ca.crt"),
        ]
        ok = _echo(node.port, *client)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # No TLS at all, or a certificate the node's CA did not sign: refused.
        assert _echo(node.port).returncode != 0
        stranger = [
            "+tls",
            str(pki / "stranger.key"),
            str(pki / "stranger.crt"),
            "+cf",
            str(pki / "ca.crt"),
        ]
        assert _echo(node.port, *stranger).returncode != 0
        # A store over TLS arrives and is indexed.
        study = generate_uid()
        path = make_instance(tmp_path / "in", study_uid=study)
        run = subprocess.run(
            [
                dcmtk("storescu"),
                *client,
                "-xe",
                "-aec",
                "DICOMNODE",
                "127.0.0.1",
                str(node.port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert node.studies()[study]["instances"] == 1


def test_tls_files_are_checked_by_config_check(tmp_path: Path) -> None:
    from dicomnode.config import parse_settings
    from dicomnode.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_settings(
            {"receive": {"allow_unknown_callers": True, "tls": {"certificate": "missing.crt"}}},
            base_dir=tmp_path,
            source=None,
        )
    problems = dict(info.value.problems)
    assert "missing.crt" in problems["receive.tls.certificate"]
    assert "required" in problems["receive.tls.private_key"]
