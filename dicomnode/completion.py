"""Study completion: quiet period per modality, force-complete age, kept in the database.

The deadlines (``study.quiet_until`` and ``study.force_complete_at``) are written
by :func:`dicomnode.index.record_instance` with every instance, so the state
lives in the database: a node killed during a quiet period completes the study
after it restarts, and several hosts can run the check side by side (a study is
moved to ``complete`` by exactly one of them).

An APScheduler interval job runs :func:`complete_due_studies`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dicomnode.db import Database, Study, StudyState, utcnow
from dicomnode.queue.studies import move_study

log = logging.getLogger(__name__)

#: Called inside the completing transaction for each study that became complete,
#: so the next stage (the job queue) records its work atomically with the completion.
CompletionHook = Callable[[Session, Study], None]


@dataclass(frozen=True)
class Completed:
    """A study that has just become complete."""

    study_instance_uid: str
    reason: str
    """``quiet`` (nothing arrived during the quiet period) or ``forced`` (age limit)."""


def complete_due_studies(
    db: Database, now: datetime | None = None, on_complete: CompletionHook | None = None
) -> list[Completed]:
    """Mark every receiving study whose deadline has passed as complete."""
    now = now or utcnow()
    due = (Study.state == StudyState.RECEIVING) & or_(
        Study.quiet_until <= now, Study.force_complete_at <= now
    )
    # Look first without the write lock: most ticks find nothing, and on SQLite a
    # write transaction would queue behind the receivers for no reason.
    with db.read() as session:
        if session.scalar(select(Study.id).where(due).limit(1)) is None:
            return []
    done: list[Completed] = []
    with db.write() as session:
        studies = session.scalars(
            select(Study).where(due).order_by(Study.quiet_until).with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            reason = "quiet" if study.quiet_until <= now else "forced"
            move_study(
                session,
                study.id,
                StudyState.COMPLETE,
                StudyState.RECEIVING,
                completed_at=now,
                completion_reason=reason,
            )
            if on_complete is not None:
                on_complete(session, study)
            done.append(Completed(study.study_instance_uid, reason))
    for item in done:
        log.info("study %s complete (%s)", item.study_instance_uid, item.reason)
    return done


class CompletionScheduler:
    """Runs :func:`complete_due_studies` every ``interval_s`` seconds in a background thread."""

    def __init__(
        self, db: Database, interval_s: float, on_complete: CompletionHook | None = None
    ) -> None:
        self.db = db
        self.on_complete = on_complete
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._tick,
            "interval",
            seconds=interval_s,
            id="complete_due_studies",
            max_instances=1,
            coalesce=True,
            next_run_time=utcnow(),
        )

    def _tick(self) -> None:
        try:
            complete_due_studies(self.db, on_complete=self.on_complete)
        except Exception:
            # The database may be briefly unavailable; the next tick tries again.
            log.exception("completion check failed; will retry")

    def start(self) -> None:
        """Start the background job."""
        self._scheduler.start()
        # APScheduler's own INFO lines ("Running job ...") every second are noise.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)

    def stop(self) -> None:
        """Stop the background job, waiting for a running check to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
