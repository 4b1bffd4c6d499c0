"""Delivery state: its one owner. The outbox holds one row per result object and
destination; rows are added when a job finishes (:func:`add_deliveries`, in the job's
transaction), reserved by a sender (:func:`claim_deliveries`) and moved by
:func:`move_delivery` along :data:`DELIVERY_TRANSITIONS` (:func:`record_delivery`).

::

    (job done) ──add──▶ pending ──sent, success or warning──▶ delivered
                   ▲       │ ──failed, past outbox.max_age_s──▶ failed
                   │       └─ failed, younger: next attempt after backoff (stays pending)
                   └── a re-run replaces the object: pending again, whatever the state
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from dicomnode.config import OutboxSettings
from dicomnode.db import Database, Delivery, DeliveryStatus, utcnow
from dicomnode.queue.retry import ERROR_LIMIT, RetryPolicy

#: How long a claimed delivery is reserved for its sender before another may take it.
LEASE_S = 120.0

#: For each state, the states a delivery may enter it from.
DELIVERY_TRANSITIONS: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.DELIVERED: frozenset({DeliveryStatus.PENDING}),
    DeliveryStatus.FAILED: frozenset({DeliveryStatus.PENDING}),
    # Only by add_deliveries: a re-run replaces an object, delivered or not.
    DeliveryStatus.PENDING: frozenset(DeliveryStatus),
}


@dataclass(frozen=True)
class OutboxItem:
    """A stored result object to deliver."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class Claimed:
    """A delivery this sender holds for one attempt."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    destination: str
    path: str


def add_deliveries(
    session: Session,
    job_id: int,
    study_id: int,
    items: Sequence[OutboxItem],
    destinations: Sequence[str],
    now: datetime,
) -> None:
    """One pending delivery per item and destination, in the caller's transaction; an
    existing row for the same object and destination is replaced (pending again)."""
    dialect = session.get_bind().dialect.name
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    for item in items:
        for destination in destinations:
            session.execute(
                insert_fn(Delivery)
                .values(
                    job_id=job_id,
                    study_id=study_id,
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
                        "job_id": job_id,
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


def claim_deliveries(db: Database, limit: int = 50, lease_s: float = LEASE_S) -> list[Claimed]:
    """Reserve due deliveries for this sender (their next attempt moves ``lease_s`` ahead)."""
    now = utcnow()
    with db.write() as session:
        rows = session.execute(
            select(
                Delivery.id,
                Delivery.sop_instance_uid,
                Delivery.sop_class_uid,
                Delivery.destination,
                Delivery.path,
            )
            .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if rows:
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_([r.id for r in rows]))
                .values(next_attempt_at=now + timedelta(seconds=lease_s))
            )
    return [Claimed(*row) for row in rows]


def move_delivery(session: Session, delivery_id: int, to: DeliveryStatus, **values: Any) -> bool:
    """Move one delivery to ``to`` (with ``values``) if its state allows it; False, and
    nothing changed, when it does not."""
    allowed = DELIVERY_TRANSITIONS[to]
    statement = (
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status.in_([s.value for s in allowed]))
        .values(status=to.value, **values)
    )
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined]


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
        attempt: dict[str, Any] = {
            "attempts": row.attempts + 1,
            "last_status": status,
            "last_error": error[:ERROR_LIMIT] if error else None,
        }
        if delivered:
            to = DeliveryStatus.DELIVERED
            attempt["delivered_at"] = now
        elif now - row.created_at >= timedelta(seconds=settings.max_age_s):
            to = DeliveryStatus.FAILED
        else:
            to = DeliveryStatus.PENDING
            attempt["next_attempt_at"] = now + policy.delay(row.attempts + 1)
        if to == DeliveryStatus.PENDING:
            session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**attempt))
        else:
            move_delivery(session, delivery_id, to, **attempt)
        return str(to)
