"""What ``dicomnode status`` shows of the queue and the outbox (read only)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from dicomnode.db import Database, Delivery, DeliveryStatus, Job, JobStatus, Study


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
