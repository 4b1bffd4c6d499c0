"""The job queue and the outbox bookkeeping, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from fixture_pipelines import FailingPipeline, SlowPipeline, result_uid
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from dicomnode.completion import complete_due_studies
from dicomnode.config import (
    CompletionSettings,
    OutboxSettings,
    PriorityRule,
    QueueSettings,
    parse_settings,
)
from dicomnode.db import (
    Database,
    Delivery,
    DeliveryStatus,
    Job,
    JobStatus,
    Study,
    StudyState,
    utcnow,
)
from dicomnode.index import InstanceMeta, Provenance, record_instance
from dicomnode.queue import (
    OutboxItem,
    RetryPolicy,
    claim,
    enqueue,
    fail,
    finish,
    heartbeat,
    queue_status,
    reclaim_stalled,
    record_delivery,
    requeue,
)
from dicomnode.storage import InstanceStore
from dicomnode.worker import Worker

QUEUE = QueueSettings(max_attempts=3, retry_backoff_s=10, stalled_after_s=30)
COMPLETION = CompletionSettings(quiet_period_s={"default": 1.0}, force_complete_s=60.0)


def _complete_studies(
    db: Database, n: int, modality: str = "CR", prefix: str = "9", queue: QueueSettings = QUEUE
) -> list[str]:
    """Receive ``n`` one-instance studies and complete them (queueing one job each)."""
    t0 = utcnow()
    uids = []
    for i in range(n):
        uid = f"{prefix}.{i + 1}"
        meta = InstanceMeta(
            StudyInstanceUID=uid,
            SeriesInstanceUID=f"{uid}.1",
            SOPInstanceUID=f"{uid}.1.1",
            SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
            TransferSyntaxUID="1.2.840.10008.1.2.1",
            Modality=modality,
        )
        record_instance(db, meta, Provenance("MOD", "127.0.0.1", "x", 1), COMPLETION, t0)
        uids.append(uid)
    complete_due_studies(
        db,
        t0 + timedelta(seconds=2),
        on_complete=lambda s, study: enqueue(s, study, queue, t0),
    )
    return uids


def _state(db: Database, uid: str) -> str:
    with db.read() as s:
        return s.scalars(select(Study.state).where(Study.study_instance_uid == uid)).one()


def test_completion_enqueues_exactly_once(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    assert _state(db, uid) == StudyState.QUEUED
    with db.write() as s:
        study = s.scalars(select(Study)).one()
        assert not enqueue(s, study, QUEUE, utcnow())  # already queued: nothing new
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
    # The database itself refuses a second queued job for the study.
    with pytest.raises(IntegrityError), db.write() as s:
        study_id = s.scalars(select(Study.id)).one()
        now = utcnow()
        s.execute(
            insert(Job).values(
                kind="analyse",
                study_id=study_id,
                status="queued",
                priority=0,
                attempts=0,
                max_attempts=1,
                run_after=now,
                created_at=now,
            )
        )


def test_claims_are_atomic_under_concurrency(db: Database) -> None:
    _complete_studies(db, 30)
    claimed: list[int] = []
    lock = threading.Lock()

    def grab(name: str) -> None:
        while (job := claim(db, name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claimed) == sorted(set(claimed))
    assert len(claimed) == 30
    with db.read() as s:
        assert s.scalar(select(func.count()).where(Job.status == JobStatus.RUNNING)) == 30


def test_priority_rules_order_claims(db: Database) -> None:
    rules = (
        PriorityRule(priority=10, modality="CT"),
        PriorityRule(priority=5, calling_ae_title="mod"),  # matched case-insensitively
    )
    queue = QueueSettings(priorities=rules)
    _complete_studies(db, 3, modality="CR", prefix="1", queue=queue)
    _complete_studies(db, 2, modality="CT", prefix="2", queue=queue)
    with db.read() as s:
        priorities = sorted(s.scalars(select(Job.priority)).all())
    assert priorities == [5, 5, 5, 10, 10]
    first = [claim(db, "w").study_instance_uid for _ in range(2)]  # type: ignore[union-attr]
    assert sorted(first) == ["2.1", "2.2"]


def test_failures_retry_with_backoff_then_fail_with_reason_and_requeue(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    policy = RetryPolicy(10, 3600)
    t = utcnow()
    for attempt in (1, 2, 3):
        job = claim(db, "w", now=t)
        assert job is not None and job.attempts == attempt
        assert _state(db, uid) == StudyState.PROCESSING
        status = fail(db, job, "w", f"boom {attempt}", policy, now=t)
        if attempt < 3:
            assert status == JobStatus.QUEUED
            assert claim(db, "w", now=t) is None  # not before its backoff
            t = t + policy.delay(attempt) + timedelta(seconds=1)
        else:
            assert status == JobStatus.FAILED
    assert policy.delay(1) == timedelta(seconds=10) and policy.delay(3) == timedelta(seconds=40)
    assert _state(db, uid) == StudyState.FAILED
    state = queue_status(db)
    assert state["jobs"]["failed"] == 1
    assert state["failed"][0]["reason"] == "boom 3"
    assert requeue(db, QUEUE, failed=True) == [uid]
    assert _state(db, uid) == StudyState.QUEUED
    assert claim(db, "w") is not None


def test_stalled_job_is_reclaimed_and_the_old_owner_cannot_finish_it(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    t0 = utcnow()
    job = claim(db, "frozen-host:1:w", now=t0)
    assert job is not None
    assert heartbeat(db, job.id, "frozen-host:1:w", now=t0 + timedelta(seconds=5))
    assert reclaim_stalled(db, QUEUE, now=t0 + timedelta(seconds=20)) == []  # still fresh
    assert reclaim_stalled(db, QUEUE, now=t0 + timedelta(seconds=40)) == [job.id]
    assert _state(db, uid) == StudyState.QUEUED
    taken = claim(db, "healthy:2:w", now=t0 + timedelta(seconds=41))
    # The interrupted attempt is given back (a dead worker is not the job's failure).
    assert taken is not None and taken.id == job.id and taken.attempts == 1
    with db.read() as s:
        assert s.scalars(select(Job.stalls)).one() == 1
    # The frozen worker wakes up: its heartbeat and its results are refused.
    assert not heartbeat(db, job.id, "frozen-host:1:w")
    assert not finish(db, job, "frozen-host:1:w", [], ["pacs"], {})
    assert finish(db, taken, "healthy:2:w", [], ["pacs"], {"ok": True})
    assert _state(db, uid) == StudyState.DONE


def test_finish_fills_the_outbox_once_per_object_and_destination(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    job = claim(db, "w")
    assert job is not None
    items = [
        OutboxItem("1.2.3.100", "1.2.840.10008.5.1.4.1.1.88.34", f"{uid}/1.2.3.100.dcm"),
        OutboxItem("1.2.3.101", "1.2.840.10008.5.1.4.1.1.7", f"{uid}/1.2.3.101.dcm"),
    ]
    assert finish(db, job, "w", items, ["pacs", "archive"], {"n": 2})
    # A later re-analysis of the study produces the same UIDs: rows are replaced, not added.
    requeue(db, QUEUE, study_instance_uid=uid)
    again = claim(db, "w")
    assert again is not None
    assert finish(db, again, "w", items, ["pacs", "archive"], {"n": 2})
    with db.read() as s:
        rows = s.scalars(select(Delivery)).all()
        assert len(rows) == 4
        assert {(r.sop_instance_uid, r.destination) for r in rows} == {
            (i.sop_instance_uid, d) for i in items for d in ("pacs", "archive")
        }
        assert all(r.job_id == again.id for r in rows)
        assert json.loads(s.scalars(select(Job.summary).where(Job.id == again.id)).one()) == {
            "n": 2
        }


def test_delivery_retry_schedule_and_max_age(db: Database) -> None:
    _complete_studies(db, 1)
    job = claim(db, "w")
    assert job is not None
    finish(db, job, "w", [OutboxItem("1.2.3.9", "1.2.840.10008.5.1.4.1.1.7", "x")], ["pacs"], {})
    settings = OutboxSettings(retry_backoff_s=10, retry_backoff_max_s=60, max_age_s=100)
    with db.read() as s:
        row = s.scalars(select(Delivery)).one()
    t = row.created_at
    assert record_delivery(db, row.id, settings, False, error="refused", now=t) == "pending"
    with db.read() as s:
        assert s.get(Delivery, row.id).next_attempt_at == t + timedelta(seconds=10)  # type: ignore[union-attr]
    assert record_delivery(db, row.id, settings, False, status=0xA700, now=t) == "pending"
    with db.read() as s:
        after = s.get(Delivery, row.id)
        assert after is not None
        assert after.next_attempt_at == t + timedelta(seconds=20) and after.last_status == 0xA700
    late = t + timedelta(seconds=101)
    assert record_delivery(db, row.id, settings, False, error="still down", now=late) == "failed"
    assert queue_status(db)["undelivered"][0]["last_error"] == "still down"
    assert queue_status(db)["deliveries"][DeliveryStatus.FAILED] == 1


def _worker_settings(tmp_path: Path, db_url: str, threads: int = 2):  # type: ignore[no-untyped-def]
    return parse_settings(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "database": {"url": db_url},
            "receive": {"allow_unknown_callers": True},
            "queue": {"poll_interval_s": 0.05, "heartbeat_interval_s": 0.5},
            "worker": {"threads": threads},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
        },
        base_dir=tmp_path,
        source=None,
    )


def test_two_workers_in_one_process_process_each_study_once(db: Database, tmp_path: Path) -> None:
    uids = _complete_studies(db, 50)
    settings = _worker_settings(tmp_path, db.url)
    pipeline = SlowPipeline()
    pipeline.delay = 0.01
    results = InstanceStore(settings.results_dir, settings.incoming_dir, 0)
    results.prepare()
    instances = InstanceStore(settings.instances_dir, settings.incoming_dir, 0)
    workers = [Worker(settings, db, pipeline, results, instances, name=f"w{i}") for i in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for t in threads:
        t.start()
    try:
        deadline = utcnow() + timedelta(seconds=120)
        while utcnow() < deadline:
            with db.read() as s:
                done = s.scalar(select(func.count()).where(Job.status == JobStatus.DONE))
            if done == 50:
                break
            stop.wait(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert sum(w.jobs_done for w in workers) == 50
    assert all(w.jobs_done > 0 for w in workers), [w.jobs_done for w in workers]
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 50
        deliveries = s.scalars(select(Delivery.sop_instance_uid)).all()
    assert sorted(deliveries) == sorted(result_uid(u) for u in uids)
    assert all(_state(db, u) == StudyState.DONE for u in uids)
    for uid in uids:
        assert (settings.results_dir / uid / f"{result_uid(uid)}.dcm").is_file()


def test_worker_records_failures_from_the_pipeline(db: Database, tmp_path: Path) -> None:
    [uid] = _complete_studies(db, 1)
    settings = _worker_settings(tmp_path, db.url, threads=1)
    store = InstanceStore(settings.results_dir, settings.incoming_dir, 0)
    store.prepare()
    worker = Worker(settings, db, FailingPipeline(), store, store)
    assert worker.run_once()
    with db.read() as s:
        job = s.scalars(select(Job)).one()
    assert job.status == JobStatus.QUEUED and job.attempts == 1
    assert f"fixture failure for {uid}" in (job.last_error or "")


def test_a_job_that_kills_its_worker_every_time_ends_failed(db: Database) -> None:
    from dicomnode.queue import STALL_ALLOWANCE

    [uid] = _complete_studies(db, 1)
    t = utcnow()
    for _ in range(QUEUE.max_attempts + STALL_ALLOWANCE):
        job = claim(db, "doomed:1:w", now=t)
        assert job is not None
        t += timedelta(seconds=QUEUE.stalled_after_s + 1)
        assert reclaim_stalled(db, QUEUE, now=t) == [job.id]
    assert claim(db, "doomed:1:w", now=t) is None
    assert _state(db, uid) == StudyState.FAILED
    assert "died 5 times" in queue_status(db)["failed"][0]["reason"]
