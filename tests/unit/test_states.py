"""One owner per state: every job, study and delivery transition, and the retry policy.

On SQLite and on a real PostgreSQL (the ``db_url`` fixture), through the functions the
node runs: each allowed transition happens, and a transition the tables do not allow
changes nothing.
"""

from __future__ import annotations

import errno
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from fixture_pipelines import BrokenPipeline, FailingPipeline
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from test_queue import QUEUE, _complete_studies, _state, _worker_settings

from dicomnode.config import OutboxSettings
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
from dicomnode.errors import ConfigError, InvalidUIDError, RetryableError, is_retryable
from dicomnode.imaging import ImageDecodeError
from dicomnode.queue import (
    OutboxItem,
    RetryPolicy,
    claim,
    fail,
    finish,
    queue_status,
    reclaim_stalled,
    record_delivery,
    requeue,
)
from dicomnode.queue.jobs import JOB_TRANSITIONS, move_job
from dicomnode.queue.outbox import DELIVERY_TRANSITIONS, move_delivery
from dicomnode.queue.studies import STUDY_TRANSITIONS, move_study
from dicomnode.storage import InstanceStore
from dicomnode.worker import Worker

POLICY = RetryPolicy(10, 3600)


def _job(db: Database) -> Job:
    with db.read() as s:
        return s.scalars(select(Job).order_by(Job.id.desc())).first()  # type: ignore[return-value]


def _study_id(db: Database, uid: str) -> int:
    with db.read() as s:
        return s.scalars(select(Study.id).where(Study.study_instance_uid == uid)).one()


# --------------------------------------------------------------------------- the tables


def test_every_state_has_a_row_and_no_state_enters_itself_except_a_replaced_delivery() -> None:
    assert set(STUDY_TRANSITIONS) == set(StudyState)
    assert set(JOB_TRANSITIONS) == set(JobStatus)
    assert set(DELIVERY_TRANSITIONS) == set(DeliveryStatus)
    assert all(to not in sources for to, sources in STUDY_TRANSITIONS.items())
    assert all(to not in sources for to, sources in JOB_TRANSITIONS.items())


# --------------------------------------------------------------------------- study


def test_study_receiving_complete_queued_processing_done(db: Database) -> None:
    [uid] = _complete_studies(db, 1)  # receiving -> complete -> queued (completion, enqueue)
    assert _state(db, uid) == StudyState.QUEUED
    job = claim(db, "w")  # queued -> processing
    assert job is not None and _state(db, uid) == StudyState.PROCESSING
    assert finish(db, job, "w", [], [], {})  # processing -> done
    assert _state(db, uid) == StudyState.DONE


def test_study_processing_skipped_and_failed(db: Database) -> None:
    uids = _complete_studies(db, 2)
    job = claim(db, "w")
    assert job is not None and finish(db, job, "w", [], [], {}, skipped_reason="no chest")
    assert _state(db, job.study_instance_uid) == StudyState.SKIPPED
    job = claim(db, "w")
    assert job is not None
    assert fail(db, job, "w", "bad", POLICY, retryable=False) == JobStatus.FAILED
    assert _state(db, job.study_instance_uid) == StudyState.FAILED
    assert {_state(db, u) for u in uids} == {StudyState.SKIPPED, StudyState.FAILED}


def test_study_refuses_a_transition_the_table_does_not_allow(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    study_id = _study_id(db, uid)
    with db.write() as s:  # queued -> done is not a transition
        assert not move_study(s, study_id, StudyState.DONE)
    assert _state(db, uid) == StudyState.QUEUED
    with db.write() as s, pytest.raises(ValueError, match="never moves from done to processing"):
        move_study(s, study_id, StudyState.PROCESSING, StudyState.DONE)
    with db.write() as s:  # a new instance re-opens a study in any other state
        assert move_study(s, study_id, StudyState.RECEIVING)
    assert _state(db, uid) == StudyState.RECEIVING


def test_study_failed_is_requeued_through_complete(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    job = claim(db, "w")
    assert job is not None
    fail(db, job, "w", "bad", POLICY, retryable=False)
    assert requeue(db, QUEUE, uid) == [uid]  # failed -> complete -> queued
    assert _state(db, uid) == StudyState.QUEUED


# --------------------------------------------------------------------------- job


def test_job_queued_running_done_and_refusals(db: Database) -> None:
    _complete_studies(db, 1)
    queued = _job(db)
    with db.write() as s:  # queued -> done and queued -> failed are not transitions
        assert not move_job(s, queued.id, JobStatus.DONE)
        assert not move_job(s, queued.id, JobStatus.FAILED)
    job = claim(db, "w")
    assert job is not None and _job(db).status == JobStatus.RUNNING
    with db.write() as s:  # another worker cannot move a job it does not hold
        assert not move_job(s, job.id, JobStatus.DONE, held_by="other")
    assert finish(db, job, "w", [], [], {}) and _job(db).status == JobStatus.DONE
    with db.write() as s:  # done is final
        assert not move_job(s, job.id, JobStatus.QUEUED)


def test_job_running_queued_by_a_retryable_failure_and_by_reclaim(db: Database) -> None:
    [uid] = _complete_studies(db, 1)
    t = utcnow()
    job = claim(db, "w", now=t)
    assert job is not None
    assert fail(db, job, "w", "database gone", POLICY, now=t, retryable=True) == JobStatus.QUEUED
    assert _state(db, uid) == StudyState.QUEUED
    t += POLICY.delay(1) + timedelta(seconds=1)
    job = claim(db, "w", now=t)
    assert job is not None and job.attempts == 2
    assert reclaim_stalled(db, QUEUE, now=t + timedelta(seconds=QUEUE.stalled_after_s + 1))
    assert _job(db).status == JobStatus.QUEUED and _state(db, uid) == StudyState.QUEUED


# --------------------------------------------------------------------------- delivery


def _delivery(db: Database) -> Delivery:
    with db.read() as s:
        return s.scalars(select(Delivery)).one()


def test_delivery_pending_delivered_failed_and_replaced(db: Database) -> None:
    _complete_studies(db, 1)
    job = claim(db, "w")
    assert job is not None
    assert finish(
        db, job, "w", [OutboxItem("1.2.3.9", "1.2.840.10008.5.1.4.1.1.7", "a")], ["p"], {}
    )
    row = _delivery(db)
    assert row.status == DeliveryStatus.PENDING
    outbox = OutboxSettings(retry_backoff_s=10, retry_backoff_max_s=60, max_age_s=100)
    assert record_delivery(db, row.id, outbox, False, 0xA700) == DeliveryStatus.PENDING
    assert record_delivery(db, row.id, outbox, True, 0x0000) == DeliveryStatus.DELIVERED
    with db.write() as s:  # delivered is final for the sender
        assert not move_delivery(s, row.id, DeliveryStatus.FAILED)
    assert record_delivery(db, row.id, outbox, False, 0xA700) == DeliveryStatus.DELIVERED
    # A re-run replaces the object: pending again.
    [uid] = [job.study_instance_uid]
    requeue(db, QUEUE, uid)
    job = claim(db, "w")
    assert job is not None
    assert finish(
        db, job, "w", [OutboxItem("1.2.3.9", "1.2.840.10008.5.1.4.1.1.7", "b")], ["p"], {}
    )
    assert _delivery(db).status == DeliveryStatus.PENDING
    late = utcnow() + timedelta(seconds=101)
    assert record_delivery(db, row.id, outbox, False, 0xA700, now=late) == DeliveryStatus.FAILED
    assert queue_status(db)["deliveries"]["failed"] == 1


# --------------------------------------------------------------------------- retry policy


@pytest.mark.parametrize(
    "exc",
    [
        RetryableError("the PACS is down"),
        MemoryError(),
        ConnectionRefusedError(),
        TimeoutError(),
        OSError(errno.ENOSPC, "No space left on device"),
        sqlite3.OperationalError("database is locked"),
        OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        IntegrityError("UPDATE job", {}, Exception("a race on a unique index")),
    ],
)
def test_outages_are_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bug"),
        KeyError("x"),
        InvalidUIDError("StudyInstanceUID is empty"),
        ImageDecodeError("instances/a.dcm", "1.2.840.10008.1.2.1", "truncated"),
        ConfigError([("cxr.members", "bad")]),
        OSError(errno.ENOENT, "No such file"),
    ],
)
def test_deterministic_failures_are_not_retryable(exc: BaseException) -> None:
    assert not is_retryable(exc)


def test_a_deterministic_failure_fails_the_job_at_once_with_its_reason(
    db: Database, tmp_path: Path
) -> None:
    [uid] = _complete_studies(db, 1)
    settings = _worker_settings(tmp_path, db.url, threads=1)
    store = InstanceStore(settings.results_dir, settings.incoming_dir, 0)
    store.prepare()
    worker = Worker(settings, db, BrokenPipeline(), store, store)
    assert worker.run_once()
    job = _job(db)
    assert job.status == JobStatus.FAILED and job.attempts == 1  # max_attempts is 3
    assert claim(db, "w") is None  # nothing left to retry
    with db.read() as s:
        reason = s.scalars(select(Study.reason).where(Study.study_instance_uid == uid)).one()
    assert reason is not None and "not retried" in reason and f"fixture bug for {uid}" in reason
    [failed] = queue_status(db)["failed"]
    assert f"fixture bug for {uid}" in failed["reason"] and failed["attempts"] == 1


def test_a_retryable_failure_is_retried(db: Database, tmp_path: Path) -> None:
    _complete_studies(db, 1)
    settings = _worker_settings(tmp_path, db.url, threads=1)
    store = InstanceStore(settings.results_dir, settings.incoming_dir, 0)
    store.prepare()
    assert Worker(settings, db, FailingPipeline(), store, store).run_once()
    job = _job(db)
    assert job.status == JobStatus.QUEUED and job.attempts == 1


def test_a_study_with_an_empty_uid_fails_at_once(db: Database, tmp_path: Path) -> None:
    """Stored with an empty Study Instance UID (or SOP Instance UID), a study cannot get
    results: it fails at the first attempt, with the reason, not after max_attempts."""
    uids = _complete_studies(db, 2)
    with db.write() as s:
        s.execute(
            Study.__table__.update()
            .where(Study.__table__.c.study_instance_uid == uids[0])
            .values(study_instance_uid="")
        )
    settings = _worker_settings(tmp_path, db.url, threads=1)
    store = InstanceStore(settings.results_dir, settings.incoming_dir, 0)
    store.prepare()
    worker = Worker(settings, db, FailingPipeline(), store, store)  # would be retried
    for _ in range(2):
        assert worker.run_once()
    with db.read() as s:
        jobs = {j.study_id: j for j in s.scalars(select(Job))}
        studies = {st.study_instance_uid: st for st in s.scalars(select(Study))}
    empty = studies[""]
    assert empty.state == StudyState.FAILED and "StudyInstanceUID is empty" in (empty.reason or "")
    assert jobs[empty.id].attempts == 1
    assert jobs[studies[uids[1]].id].status == JobStatus.QUEUED  # the other one: retryable
