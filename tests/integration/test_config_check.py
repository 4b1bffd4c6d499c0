"""``serve`` refuses a configuration whose models are wrong (exit 2, the config message, no
traceback, no port opened), and ``config check --connect`` C-ECHOes every destination
(Orthanc as the PACS, and a port where nothing listens).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import OrthancServer, free_port, node_env, write_config

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"


def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=node_env(),
        cwd=config.parent,
    )


@pytest.mark.timeout(120)
def test_serve_exits_2_with_the_config_message_on_a_misspelled_model(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        worker={"processes": 1, "pipeline": "chest"},
        cxr={"models_dir": str(MODELS), "members": ["cxr-vgg16", "cxr-vgg61"]},
        ct={"models_dir": str(MODELS)},
    )
    check = _cli(config, "config", "check")
    run = _cli(config, "serve")
    assert check.returncode == run.returncode == 2, run.stderr
    for output in (check.stderr, run.stderr):
        assert "configuration is invalid" in output
        assert "cxr.members[1]: no model named 'cxr-vgg61'" in output
    assert "Traceback" not in run.stdout + run.stderr
    assert "listening on" not in run.stdout + run.stderr
    with socket.socket() as probe:  # nothing was left listening on the node's port
        probe.bind(("127.0.0.1", port))


@pytest.mark.timeout(120)
def test_config_check_connect_echoes_every_destination(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")
    orthanc.start()
    try:
        nowhere = free_port()
        config = write_config(
            tmp_path / "node",
            free_port(),
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.port},
                {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": nowhere},
            ],
        )
        run = _cli(config, "config", "check", "--connect")
        lines = {ln.split(":")[0].strip(): ln for ln in run.stdout.splitlines()}
        assert run.returncode == 1, run.stdout + run.stderr
        assert lines["destination pacs"].endswith("C-ECHO success")
        assert f"GONE@127.0.0.1:{nowhere}" in lines["destination gone"]
        assert "C-ECHO success" not in lines["destination gone"]

        plain = _cli(config, "config", "check")  # without --connect: no network at all
        assert plain.returncode == 0 and "C-ECHO" not in plain.stdout
    finally:
        orthanc.stop()
