"""Jobs as rows: enqueue, atomic claim, heartbeat, retry with backoff, stalled-job reclaim.

Guarantees, each enforced by the database rather than by timing:

* at most one queued and one running job per study (partial unique indexes);
* a claim is atomic: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE``
  on SQLite, so two workers never run the same job;
* only the worker that holds a job can finish it: every transition checks
  ``status = 'running' AND worker = <me>``; a worker whose job was reclaimed
  (it stalled) loses its results, and the new owner's run counts;
* result objects enter the outbox in the same transaction that marks the job
  done, keyed by (SOP Instance UID, destination), so a re-run never duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased

from dicomnode.config import OutboxSettings, PriorityRule, QueueSettings
from dicomnode.db import (
    Database,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Series,
    Study,
    StudyState,
    utcnow,
)

log = logging.getLogger("dicomnode.queue")

ANALYSE = "analyse"
#: Worker deaths a job may see beyond ``max_attempts`` before it is failed.
STALL_ALLOWANCE = 2
#: Longest error text kept per job (the full traceback goes to the log).
_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base``, ``2 * base``, ``4 * base`` ... capped at ``maximum``."""

    base_s: float
    maximum_s: float

    def delay(self, attempts: int) -> timedelta:
        """The wait before attempt ``attempts + 1``."""
        return timedelta(seconds=min(self.maximum_s, self.base_s * 2 ** max(0, attempts - 1)))


def worker_identity(name: str = "w") -> str:
    """A worker ID that tells host and process: ``host:pid:name``."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"


def _worker_is_dead_here(worker: str | None) -> bool:
    """True when ``worker`` ran on this host in a process that no longer exists."""
    if not worker:
        return False
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# --------------------------------------------------------------------------- enqueue


def study_priority(session: Session, study_id: int, rules: Sequence[PriorityRule]) -> int:
    """The highest priority among the rules that match the study (0 when none)."""
    if not rules:
        return 0
    rows = session.execute(
        select(
            Instance.calling_ae_title,
            Instance.modality,
            Instance.body_part_examined,
            Series.series_description,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.study_id == study_id)
        .distinct()
    ).all()
    best: int | None = None
    for rule in rules:
        wanted = {f: getattr(rule, f) for f in PriorityRule.FIELDS if getattr(rule, f)}
        for row in rows:
            values = dict(zip(PriorityRule.FIELDS, row, strict=True))
            if all((values[f] or "").upper() == v.upper() for f, v in wanted.items()):
                best = rule.priority if best is None else max(best, rule.priority)
                break
    return best or 0


def enqueue(
    session: Session, study: Study, settings: QueueSettings, now: datetime, kind: str = ANALYSE
) -> bool:
    """Queue an analysis of ``study`` in the caller's transaction; False if one is queued."""
    dialect = session.get_bind().dialect.name
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert_fn(Job)
        .values(
            kind=kind,
            study_id=study.id,
            status=JobStatus.QUEUED,
            priority=study_priority(session, study.id, settings.priorities),
            attempts=0,
            max_attempts=settings.max_attempts,
            stalls=0,
            run_after=now,
            created_at=now,
        )
        .on_conflict_do_nothing(
            # Literal, so PostgreSQL matches it against the partial index's predicate.
            index_elements=["study_id"],
            index_where=text("status = 'queued'"),
        )
    )
    created = session.execute(statement).rowcount == 1
    if study.state in (StudyState.COMPLETE, StudyState.RECEIVING):
        study.state = StudyState.QUEUED
    return created


# --------------------------------------------------------------------------- claim and run


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds."""

    id: int
    kind: str
    study_id: int
    study_instance_uid: str
    attempts: int
    max_attempts: int
    priority: int


def claim(db: Database, worker: str, now: datetime | None = None) -> ClaimedJob | None:
    """Take the most urgent runnable job, atomically; None when there is none.

    First a read: is any job queued and due? Idle workers ask this every
    ``queue.poll_interval_s``, and it costs a seventh of a write transaction
    (0.25 against 1.8 ms of CPU on SQLite), which also takes the write lock that
    the receivers' index writes need. When there is one, two statements: an
    UPDATE of the chosen job (chosen by a locking sub-select, ``SKIP LOCKED`` on
    PostgreSQL) with RETURNING, and the study's state change.
    """
    now = now or utcnow()
    with db.read() as session:
        due = select(exists().where(Job.status == JobStatus.QUEUED, Job.run_after <= now))
        if not session.execute(due).scalar():
            return None
    running = aliased(Job)
    candidate = (
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.run_after <= now,
            ~exists().where(running.study_id == Job.study_id, running.status == JobStatus.RUNNING),
        )
        .order_by(Job.priority.desc(), Job.run_after, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=Job)
        .scalar_subquery()
    )
    with db.write() as session:
        job = session.execute(
            update(Job)
            .where(Job.id == candidate, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                worker=worker,
                heartbeat_at=now,
                started_at=now,
                attempts=Job.attempts + 1,
            )
            .returning(Job.id, Job.kind, Job.study_id, Job.attempts, Job.max_attempts, Job.priority)
        ).first()
        if job is None:
            return None
        uid = session.execute(
            update(Study)
            .where(Study.id == job.study_id)
            .values(
                state=case(
                    (Study.state == StudyState.QUEUED, StudyState.PROCESSING.value),
                    else_=Study.state,
                )
            )
            .returning(Study.study_instance_uid)
        ).scalar_one()
    return ClaimedJob(
        id=job.id,
        kind=job.kind,
        study_id=job.study_id,
        study_instance_uid=uid,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        priority=job.priority,
    )


def heartbeat(db: Database, job_id: int, worker: str, now: datetime | None = None) -> bool:
    """Record that ``worker`` still runs ``job_id``; False if the job is no longer its own."""
    with db.write() as session:
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(heartbeat_at=now or utcnow())
        ).rowcount
    return changed == 1


@dataclass(frozen=True)
class OutboxItem:
    """A stored result object to deliver."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str


def finish(
    db: Database,
    job: ClaimedJob,
    worker: str,
    items: Sequence[OutboxItem],
    destinations: Sequence[str],
    summary: dict[str, Any],
    skipped_reason: str | None = None,
    now: datetime | None = None,
    note: str | None = None,
) -> bool:
    """Mark the job done and put its result objects in the outbox, in one transaction.

    The study becomes ``skipped`` with ``skipped_reason`` when one is given, else ``done``
    with ``note`` (what the analysis left out, e.g. skipped CT series) as its reason.

    Returns False (and changes nothing) when the job is no longer this worker's.
    """
    now = now or utcnow()
    with db.write() as session:
        owned = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(
                status=JobStatus.DONE,
                finished_at=now,
                last_error=None,
                summary=json.dumps(summary, sort_keys=True, default=str),
            )
        ).rowcount
        if owned != 1:
            return False
        dialect = session.get_bind().dialect.name
        insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
        for item in items:
            for destination in destinations:
                session.execute(
                    insert_fn(Delivery)
                    .values(
                        job_id=job.id,
                        study_id=job.study_id,
                        sop_instance_uid=item.sop_instance_uid,
                        sop_class_uid=item.sop_class_uid,
                        destination=destination,
                        path=item.path,
                        status=DeliveryStatus.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                    .on_conflict_do_update(
                        index_elements=["sop_instance_uid", "destination"],
                        # A re-run replaces the object: deliver the new version once.
                        set_={
                            "job_id": job.id,
                            "path": item.path,
                            "status": DeliveryStatus.PENDING,
                            "attempts": 0,
                            "next_attempt_at": now,
                            "last_error": None,
                            "last_status": None,
                            "created_at": now,
                            "delivered_at": None,
                        },
                    )
                )
        state, reason = (
            (StudyState.SKIPPED, skipped_reason) if skipped_reason else (StudyState.DONE, note)
        )
        session.execute(
            update(Study)
            .where(Study.id == job.study_id, Study.state == StudyState.PROCESSING)
            .values(state=state, reason=reason)
        )
    return True


def fail(
    db: Database,
    job: ClaimedJob,
    worker: str,
    error: str,
    policy: RetryPolicy,
    now: datetime | None = None,
) -> str | None:
    """Record a failed attempt: retry later, or fail for good after the last attempt.

    Returns the job's new status, or None when the job is no longer this worker's.
    """
    now = now or utcnow()
    error = error[:_ERROR_LIMIT]
    with db.write() as session:
        final = job.attempts >= job.max_attempts
        values: dict[str, Any] = {"last_error": error, "worker": None, "heartbeat_at": None}
        if final:
            values.update(status=JobStatus.FAILED, finished_at=now)
        else:
            values.update(status=JobStatus.QUEUED, run_after=now + policy.delay(job.attempts))
        if not final and _has_queued_job(session, job.study_id):
            # New instances queued a fresh analysis meanwhile; that one supersedes this.
            values.update(status=JobStatus.FAILED, finished_at=now)
            values["last_error"] = f"superseded by a newer job; last error: {error}"
        owned = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.worker == worker, Job.status == JobStatus.RUNNING)
            .values(**values)
        ).rowcount
        if owned != 1:
            return None
        status = values["status"]
        study_state = StudyState.FAILED if status == JobStatus.FAILED else StudyState.QUEUED
        session.execute(
            update(Study)
            .where(Study.id == job.study_id, Study.state == StudyState.PROCESSING)
            .values(
                state=study_state,
                reason=f"failed after {job.attempts} attempt(s): {error}"
                if study_state == StudyState.FAILED
                else None,
            )
        )
    return str(status)


def _has_queued_job(session: Session, study_id: int) -> bool:
    return (
        session.execute(
            select(Job.id).where(Job.study_id == study_id, Job.status == JobStatus.QUEUED)
        ).first()
        is not None
    )


def reclaim_stalled(
    db: Database, settings: QueueSettings, now: datetime | None = None
) -> list[int]:
    """Take back running jobs whose worker stopped heartbeating (or died on this host)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.stalled_after_s)
    with db.read() as session:
        running = session.execute(
            select(Job.id, Job.worker, Job.heartbeat_at).where(Job.status == JobStatus.RUNNING)
        ).all()
    stalled = [
        row
        for row in running
        if (row.heartbeat_at is not None and row.heartbeat_at < cutoff)
        or _worker_is_dead_here(row.worker)
    ]
    reclaimed = []
    for row in stalled:
        with db.write() as session:
            job = session.execute(
                select(Job)
                .where(Job.id == row.id, Job.status == JobStatus.RUNNING, Job.worker == row.worker)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if job is None:
                continue  # finished, or reclaimed by someone else, meanwhile
            error = (
                f"worker {job.worker} stopped while running the job "
                f"(no heartbeat since {job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)"
            )
            job.last_error = error
            job.worker = None
            job.heartbeat_at = None
            job.stalls += 1
            # A power cut or a killed node is not the job's fault: the interrupted attempt
            # is given back. A job that kills its worker every time still ends, after
            # max_attempts + STALL_ALLOWANCE deaths.
            job.attempts = max(0, job.attempts - 1)
            too_many = job.stalls >= job.max_attempts + STALL_ALLOWANCE
            if too_many or _has_queued_job(session, job.study_id):
                job.status = JobStatus.FAILED
                job.finished_at = now
                study_state = StudyState.FAILED
                if too_many:
                    job.last_error = f"the worker died {job.stalls} times running it; {error}"
                else:
                    job.last_error = f"superseded by a newer job; {error}"
                    study_state = StudyState.QUEUED
            else:
                job.status = JobStatus.QUEUED
                job.run_after = now
                study_state = StudyState.QUEUED
            session.execute(
                update(Study)
                .where(Study.id == job.study_id, Study.state == StudyState.PROCESSING)
                .values(
                    state=study_state,
                    reason=job.last_error if study_state == StudyState.FAILED else None,
                )
            )
            reclaimed.append(job.id)
            log.warning("reclaimed job %d: %s", job.id, error)
    return reclaimed


# --------------------------------------------------------------------------- operator actions


def requeue(
    db: Database,
    settings: QueueSettings,
    study_instance_uid: str | None = None,
    failed: bool = False,
    now: datetime | None = None,
) -> list[str]:
    """Queue a new analysis for one study, or for every study whose last job failed."""
    now = now or utcnow()
    with db.write() as session:
        query = select(Study)
        if study_instance_uid is not None:
            query = query.where(Study.study_instance_uid == study_instance_uid)
        if failed:
            query = query.where(Study.state == StudyState.FAILED)
        studies = session.scalars(query).all()
        done = []
        for study in studies:
            if study.state == StudyState.RECEIVING:
                continue  # it will be queued when it completes
            busy = session.execute(
                select(Job.id).where(
                    Job.study_id == study.id,
                    Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                )
            ).first()
            if busy is not None:
                continue
            study.state = StudyState.COMPLETE
            study.reason = None
            enqueue(session, study, settings, now)
            done.append(study.study_instance_uid)
    return done


# --------------------------------------------------------------------------- outbox schedule


def due_deliveries(db: Database, limit: int = 100, now: datetime | None = None) -> list[Delivery]:
    """Pending deliveries whose next attempt is due, oldest first."""
    now = now or utcnow()
    with db.read() as session:
        return list(
            session.scalars(
                select(Delivery)
                .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now)
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            ).all()
        )


def record_delivery(
    db: Database,
    delivery_id: int,
    settings: OutboxSettings,
    delivered: bool,
    status: int | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> str:
    """Record one delivery attempt: delivered, retry later, or failed past the maximum age."""
    now = now or utcnow()
    policy = RetryPolicy(settings.retry_backoff_s, settings.retry_backoff_max_s)
    with db.write() as session:
        row = session.get(Delivery, delivery_id, with_for_update=True)
        if row is None or row.status != DeliveryStatus.PENDING:
            return row.status if row else "missing"
        row.attempts += 1
        row.last_status = status
        row.last_error = error[:_ERROR_LIMIT] if error else None
        if delivered:
            row.status = DeliveryStatus.DELIVERED
            row.delivered_at = now
        elif now - row.created_at >= timedelta(seconds=settings.max_age_s):
            row.status = DeliveryStatus.FAILED
        else:
            row.next_attempt_at = now + policy.delay(row.attempts)
        return str(row.status)


# --------------------------------------------------------------------------- status


def queue_status(db: Database, limit: int = 20) -> dict[str, Any]:
    """Queue depth by status, running and failed jobs, deliveries: for ``dicomnode status``."""
    with db.read() as session:
        depth = {s.value: 0 for s in JobStatus}
        for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
            depth[status] = count
        running = [
            {
                "study_instance_uid": uid,
                "job": job_id,
                "worker": worker,
                "attempt": attempts,
                "started_at": started.isoformat() if started else None,
                "heartbeat_at": beat.isoformat() if beat else None,
            }
            for job_id, uid, worker, attempts, started, beat in session.execute(
                select(
                    Job.id,
                    Study.study_instance_uid,
                    Job.worker,
                    Job.attempts,
                    Job.started_at,
                    Job.heartbeat_at,
                )
                .join(Study, Study.id == Job.study_id)
                .where(Job.status == JobStatus.RUNNING)
                .order_by(Job.started_at)
            )
        ]
        failed = [
            {
                "study_instance_uid": uid,
                "job": job_id,
                "attempts": attempts,
                "reason": error,
                "finished_at": finished.isoformat() if finished else None,
            }
            for job_id, uid, attempts, error, finished in session.execute(
                select(
                    Job.id, Study.study_instance_uid, Job.attempts, Job.last_error, Job.finished_at
                )
                .join(Study, Study.id == Job.study_id)
                .where(Job.status == JobStatus.FAILED)
                .order_by(Job.finished_at.desc())
                .limit(limit)
            )
        ]
        deliveries = {s.value: 0 for s in DeliveryStatus}
        for status, count in session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)
        ):
            deliveries[status] = count
        undelivered = [
            {
                "sop_instance_uid": row.sop_instance_uid,
                "destination": row.destination,
                "status": row.status,
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "next_attempt_at": row.next_attempt_at.isoformat(),
            }
            for row in session.scalars(
                select(Delivery)
                .where(Delivery.status != DeliveryStatus.DELIVERED)
                .order_by(Delivery.created_at.desc())
                .limit(limit)
            )
        ]
    return {
        "jobs": depth,
        "running": running,
        "failed": failed,
        "deliveries": deliveries,
        "undelivered": undelivered,
    }


__all__ = [
    "ANALYSE",
    "ClaimedJob",
    "OutboxItem",
    "RetryPolicy",
    "claim",
    "due_deliveries",
    "enqueue",
    "fail",
    "finish",
    "heartbeat",
    "queue_status",
    "reclaim_stalled",
    "record_delivery",
    "requeue",
    "worker_identity",
]
