"""The outbox sender against Orthanc as the PACS: delivery, outage, rejection, echo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fixture_pipelines import _result
from sqlalchemy import select, update
from support import OrthancServer, queue_studies, write_config

from dicomnode.config import load_settings
from dicomnode.db import Database, Delivery, DeliveryStatus, utcnow
from dicomnode.pipelines.types import StudyInput
from dicomnode.queue import OutboxItem, claim, finish
from dicomnode.send import Sender, echo
from dicomnode.serve import make_results_store

pytestmark = pytest.mark.integration


def _setup(tmp_path: Path, orthanc: OrthancServer, **extra: Any) -> tuple[Any, Database, Sender]:
    config = write_config(
        tmp_path / "node",
        1,
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.port,
            }
        ],
        outbox={"retry_backoff_s": 0.5, "retry_backoff_max_s": 1, **extra},
    )
    settings = load_settings(config)
    db = Database(settings.database.url)
    db.migrate()
    results = make_results_store(settings)
    results.prepare()
    return settings, db, Sender(settings, db, results)


def _queue_result(settings: Any, db: Database, sender: Sender) -> str:
    """A finished job whose one result object waits in the outbox; returns its SOP UID."""
    [study_uid] = queue_studies(db, settings, 1)
    job = claim(db, "t:1:w")
    assert job is not None
    obj = _result(StudyInput(study_uid, ()))
    relative = f"{study_uid}/{obj.sop_instance_uid}.dcm"
    sender.results.write(obj.data, relative)
    assert finish(
        db,
        job,
        "t:1:w",
        [OutboxItem(obj.sop_instance_uid, obj.sop_class_uid, relative)],
        ["pacs"],
        {},
    )
    return obj.sop_instance_uid


def _row(db: Database) -> Delivery:
    with db.read() as s:
        return s.scalars(select(Delivery)).one()


def _make_due(db: Database) -> None:
    with db.write() as s:
        s.execute(update(Delivery).values(next_attempt_at=utcnow()))


def test_results_reach_orthanc_once_even_across_an_outage(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")
    settings, db, sender = _setup(tmp_path, orthanc)
    uid = _queue_result(settings, db, sender)
    # Orthanc is down: the attempt fails, visibly, and the row waits for its retry.
    assert sender.send_due() == 0
    row = _row(db)
    assert row.status == DeliveryStatus.PENDING and row.attempts == 1
    assert "no association" in (row.last_error or "")
    orthanc.start()
    try:
        assert echo(settings.destinations[0], settings.node.ae_title) == "success"
        _make_due(db)
        assert sender.send_due() == 1
        assert sender.send_due() == 0  # nothing left: delivered exactly once
        row = _row(db)
        assert row.status == DeliveryStatus.DELIVERED and row.last_status == 0
        assert orthanc.sop_instance_uids() == [uid]
    finally:
        orthanc.stop()


def test_a_destination_that_rejects_leaves_a_visible_failure(tmp_path: Path) -> None:
    # Orthanc that accepts stores from its known modalities only; the node is not one.
    orthanc = OrthancServer(
        tmp_path / "orthanc", DicomAlwaysAllowStore=False, DicomAlwaysAllowEcho=False
    )
    orthanc.start()
    try:
        settings, db, sender = _setup(tmp_path, orthanc, max_age_s=1)
        _queue_result(settings, db, sender)
        assert sender.send_due() == 0
        first = _row(db)
        assert first.status == DeliveryStatus.PENDING and first.last_error
        time.sleep(1.1)
        _make_due(db)
        sender.send_due()
        row = _row(db)
        assert row.status == DeliveryStatus.FAILED
        assert row.attempts == 2 and ("rejected" in row.last_error or "status" in row.last_error)
        assert orthanc.get("/instances") == []
    finally:
        orthanc.stop()


def test_sending_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    """The destination is another node that accepts DICOM over TLS from known CAs only."""
    from support import make_pki, running_node

    pki = make_pki(tmp_path / "pki")
    tls = {
        "certificate": str(pki / "server.crt"),
        "private_key": str(pki / "server.key"),
        "ca_certificates": str(pki / "ca.crt"),
    }
    with running_node(
        tmp_path / "pacs", **{"receive": {"allow_unknown_callers": True}, "receive.tls": tls}
    ) as pacs:
        config = write_config(
            tmp_path / "node",
            1,
            destinations=[
                {"name": "pacs", "ae_title": "DICOMNODE", "host": "127.0.0.1", "port": pacs.port}
            ],
        )
        # [destinations.tls] belongs to the last [[destinations]] table.
        config.write_text(
            config.read_text()
            + "\n[destinations.tls]\n"
            + f'ca_certificates = "{pki / "ca.crt"}"\n'
            + f'certificate = "{pki / "client.crt"}"\n'
            + f'private_key = "{pki / "client.key"}"\n'
        )
        settings = load_settings(config)
        assert settings.destinations[0].tls is not None
        assert echo(settings.destinations[0], settings.node.ae_title) == "success"
        db = Database(settings.database.url)
        db.migrate()
        results = make_results_store(settings)
        results.prepare()
        sender = Sender(settings, db, results)
        uid = _queue_result(settings, db, sender)
        assert sender.send_due() == 1
        assert _row(db).status == DeliveryStatus.DELIVERED
        stored = {p.stem for p in (pacs.data_dir / "instances").rglob("*.dcm")}
        assert uid in stored
