"""The queue: job, study and delivery state, each with one owner.

* :mod:`dicomnode.queue.jobs`: jobs (enqueue, claim, heartbeat, finish, fail, reclaim,
  requeue), :func:`~dicomnode.queue.jobs.move_job`;
* :mod:`dicomnode.queue.studies`: study state,
  :func:`~dicomnode.queue.studies.move_study` (completion and the index use it too);
* :mod:`dicomnode.queue.outbox`: deliveries, :func:`~dicomnode.queue.outbox.move_delivery`;
* :mod:`dicomnode.queue.status`: what ``dicomnode status`` shows.
"""

from dicomnode.queue.jobs import (
    ANALYSE,
    STALL_ALLOWANCE,
    ClaimedJob,
    claim,
    enqueue,
    fail,
    finish,
    heartbeat,
    reclaim_stalled,
    requeue,
    study_priority,
    worker_identity,
)
from dicomnode.queue.outbox import OutboxItem, claim_deliveries, record_delivery
from dicomnode.queue.retry import RetryPolicy
from dicomnode.queue.status import queue_status

__all__ = [
    "ANALYSE",
    "STALL_ALLOWANCE",
    "ClaimedJob",
    "OutboxItem",
    "RetryPolicy",
    "claim",
    "claim_deliveries",
    "enqueue",
    "fail",
    "finish",
    "heartbeat",
    "queue_status",
    "reclaim_stalled",
    "record_delivery",
    "requeue",
    "study_priority",
    "worker_identity",
]
