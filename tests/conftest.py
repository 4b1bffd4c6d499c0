"""Fixtures: a real PostgreSQL server started by the suite, and database URLs per backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from support import PostgresServer, pg_bin_dir

from dicomnode.db import Database

# TensorFlow's start-up chatter (no GPU here, oneDNN notes) is noise in test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session; skips when the binaries are missing."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
    root.chmod(0o755)
    server = PostgresServer(bin_dir, root / "pg")
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}")
    time.sleep(0.2)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def db(db_url: str) -> Database:
    """A migrated empty index and queue database on each backend (``db_url``)."""
    database = Database(db_url)
    database.migrate()
    return database


@pytest.fixture(scope="module", params=[True, False], ids=["fast_path", "stock_path"])
def receive_path(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Run a module's nodes on the receive fast path, then on pynetdicom's stock path.

    ``receive.fast_path`` of every configuration ``support.write_config`` writes meanwhile
    (docs/receive.md); tests that need one path only skip on the other with the reason.
    """
    support.RECEIVE_FAST_PATH = request.param
    try:
        yield request.param
    finally:
        support.RECEIVE_FAST_PATH = True
