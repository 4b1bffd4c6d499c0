"""Retention deletes only studies that are analysed and delivered, by age and by high water.

Studies are made as the node makes them (index, completion, queue, outbox functions) with
real instance and result files; the disk usage is the one thing simulated (a full disk
cannot be made here), as a function of which files are left.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from support import write_config

from dicomnode.completion import complete_due_studies
from dicomnode.config import Settings, load_settings
from dicomnode.db import Database, Delivery, DeliveryStatus, Study, utcnow
from dicomnode.index import InstanceMeta, Provenance, record_instance
from dicomnode.queue import OutboxItem, RetryPolicy, claim, enqueue, fail, finish, record_delivery
from dicomnode.retention import Retention

NOW = utcnow()
OLD = NOW - timedelta(days=2)


def _settings(tmp_path: Path, **retention: float) -> Settings:
    config = write_config(
        tmp_path,
        11112,
        retention=retention,
        queue={"max_attempts": 1},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    )
    return load_settings(config)


def _receive(settings: Settings, db: Database, when: datetime) -> tuple[str, Path]:
    """One stored and indexed CR instance of a new study; its Study UID and file."""
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    relative = f"{study}/{series}/{sop}.dcm"
    path = settings.instances_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 1000)
    meta = InstanceMeta(
        study, series, sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR"
    )
    record_instance(
        db, meta, Provenance("T", "127.0.0.1", relative, 1000), settings.completion, when
    )
    return study, path


def _analyse(settings: Settings, db: Database, outcome: str) -> Path | None:
    """Run the next queued job to ``outcome`` (done / failed); the result file when done."""
    job = claim(db, "w", now=NOW)
    assert job is not None
    if outcome == "failed":
        fail(db, job, "w", "boom", RetryPolicy(1, 1), now=NOW)
        return None
    sop = generate_uid()
    relative = f"{job.study_instance_uid}/{sop}.dcm"
    result = settings.results_dir / relative
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_bytes(b"\0" * 500)
    item = OutboxItem(sop, "1.2.840.10008.5.1.4.1.1.88.34", relative)
    assert finish(db, job, "w", [item], ["pacs"], {"pipeline": "test"}, now=NOW)
    return result


def _deliver(settings: Settings, db: Database, study_uid: str, status: str) -> None:
    with db.read() as session:
        (delivery_id,) = session.scalars(
            select(Delivery.id).join(Study).where(Study.study_instance_uid == study_uid)
        ).all()
    if status == "delivered":
        record_delivery(db, delivery_id, settings.outbox, True, status=0)
    elif status == "failed":  # past outbox.max_age_s: the outbox gave up
        with db.write() as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(status=DeliveryStatus.FAILED)
            )


def _study(
    settings: Settings, db: Database, when: datetime, outcome: str, delivery: str
) -> dict[str, Any]:
    uid, instance = _receive(settings, db, when)
    complete_due_studies(
        db, NOW + timedelta(days=1), on_complete=lambda s, st: enqueue(s, st, settings.queue, NOW)
    )
    result = _analyse(settings, db, outcome)
    if result is not None:
        _deliver(settings, db, uid, delivery)
    return {"uid": uid, "files": [p for p in (instance, result) if p is not None]}


def _exists(db: Database, uid: str) -> bool:
    with db.read() as session:
        return session.scalar(select(Study.id).where(Study.study_instance_uid == uid)) is not None


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'index.db'}")
    database.migrate()
    return database


def test_only_analysed_and_delivered_studies_past_the_age_are_deleted(
    tmp_path: Path, db: Database
) -> None:
    settings = _settings(tmp_path, delete_after_s=3600)
    gone = _study(settings, db, OLD, "done", "delivered")
    pending = _study(settings, db, OLD, "done", "pending")
    undeliverable = _study(settings, db, OLD, "done", "failed")
    failed = _study(settings, db, OLD, "failed", "")
    recent = _study(settings, db, NOW, "done", "delivered")
    # Received long ago but still within its quiet period's reach: never completed.
    receiving_uid, receiving_file = _receive(settings, db, OLD)

    deleted = Retention(settings, db).run_once(now=NOW)

    assert deleted.studies == 1 and deleted.files == 2 and deleted.bytes == 1500
    assert not _exists(db, gone["uid"])
    assert not any(p.exists() for p in gone["files"])
    assert not (settings.instances_dir / gone["uid"]).exists(), "empty folders are removed"
    assert not (settings.results_dir / gone["uid"]).exists()
    for kept in (pending, undeliverable, failed, recent):
        assert _exists(db, kept["uid"])
        assert all(p.exists() for p in kept["files"])
    assert _exists(db, receiving_uid) and receiving_file.exists()
    with db.read() as session:  # the deleted study's outbox rows went with it
        assert (
            session.scalar(select(Delivery.id).where(Delivery.path.contains(gone["uid"]))) is None
        )


def test_above_high_water_the_oldest_finished_studies_go_until_below(
    tmp_path: Path, db: Database
) -> None:
    settings = _settings(tmp_path, high_water_percent=90)
    older = _study(settings, db, NOW - timedelta(hours=2), "done", "delivered")
    newer = _study(settings, db, NOW - timedelta(hours=1), "done", "delivered")
    pending = _study(settings, db, OLD, "done", "pending")

    def usage(_path: Path) -> tuple[int, int, int]:
        # 80 % plus 10 % per delivered study's instance file still on disk.
        left = sum(s["files"][0].exists() for s in (older, newer))
        used = 80 + 10 * left
        return 100, used, 100 - used

    deleted = Retention(settings, db, disk_usage=usage).run_once(now=NOW)
    assert deleted.studies == 1
    assert not _exists(db, older["uid"]), "the least recently received goes first"
    assert _exists(db, newer["uid"]), "once at the mark (90 %), nothing more is deleted"
    assert _exists(db, pending["uid"]), "undelivered results are never deleted"


def test_a_study_that_changes_before_its_turn_is_kept(tmp_path: Path, db: Database) -> None:
    settings = _settings(tmp_path, delete_after_s=3600)
    study = _study(settings, db, OLD, "done", "delivered")
    retention = Retention(settings, db)
    ((study_id, expired),) = retention.candidates(NOW)
    assert expired
    with db.write() as session:  # a late instance re-opened it meanwhile
        session.execute(update(Study).where(Study.id == study_id).values(state="receiving"))
    assert retention._delete(study_id).studies == 0  # the locked re-check refuses it
    assert retention.run_once(now=NOW).studies == 0
    assert _exists(db, study["uid"]) and all(p.exists() for p in study["files"])


def test_retention_is_off_by_default(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, 11112))
    assert not settings.retention.enabled
