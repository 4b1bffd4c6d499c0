"""Retention: delete studies the node is finished with, by age and by a disk high-water mark.

A study may be deleted only when the node has nothing left to do with it:

* its analysis ended (state ``done`` or ``skipped``; never ``receiving``, ``complete``,
  ``queued``, ``processing`` or ``failed``: a failed study waits for an admin's
  ``requeue``);
* no job of it is queued or running;
* every result object of it was delivered to every destination (no ``pending`` and no
  ``failed`` outbox row).

Of those, a study is deleted when nothing has arrived for it for ``retention.delete_after_s``,
and, while the disk holding ``node.data_dir`` is fuller than
``retention.high_water_percent``, the least recently received ones go first until it is
not. Deleting a study removes its rows (study, series, instances, jobs, deliveries) in
one transaction that checks the conditions again under a lock, then its instance and
result files. An instance arriving meanwhile starts a new study row and keeps its file.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, delete, exists, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.config import RetentionSettings, Settings
from dicomnode.db import Database, Delivery, DeliveryStatus, Instance, Job, JobStatus, Study, utcnow
from dicomnode.db.models import StudyState

log = logging.getLogger("dicomnode.retention")

#: States of a study whose analysis has ended successfully.
FINISHED_STATES = (StudyState.DONE, StudyState.SKIPPED)

#: (total, used, free) bytes of the file system holding a path, as shutil.disk_usage.
DiskUsage = Callable[[Path], tuple[int, int, int]]


def _disk_usage(path: Path) -> tuple[int, int, int]:
    usage = shutil.disk_usage(path)
    return usage.total, usage.used, usage.free


def _deletable() -> list[ColumnElement[bool]]:
    """SQL conditions under which a study may be deleted (see the module docstring)."""
    busy_job = exists().where(
        and_(Job.study_id == Study.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    )
    undelivered = exists().where(
        and_(Delivery.study_id == Study.id, Delivery.status != DeliveryStatus.DELIVERED)
    )
    return [Study.state.in_(list(FINISHED_STATES)), ~busy_job, ~undelivered]


@dataclass(frozen=True)
class Deleted:
    """What one pass removed."""

    studies: int = 0
    files: int = 0
    bytes: int = 0


class Retention:
    """Deletes finished, delivered studies by age and by the disk high-water mark."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        disk_usage: DiskUsage = _disk_usage,
    ) -> None:
        self.settings = settings
        self.rules: RetentionSettings = settings.retention
        self.db = db
        self.disk_usage = disk_usage

    def _above_high_water(self) -> bool:
        percent = self.rules.high_water_percent
        if not percent:
            return False
        total, used, _free = self.disk_usage(self.settings.node.data_dir)
        return total > 0 and used * 100 / total > percent

    def candidates(self, now: datetime, limit: int = 100) -> list[tuple[int, bool]]:
        """(study id, whether it is past the age) of deletable studies, oldest first."""
        with self.db.read() as session:
            rows = session.execute(
                select(Study.id, Study.last_received_at)
                .where(*_deletable())
                .order_by(Study.last_received_at, Study.id)
                .limit(limit)
            ).all()
        after = self.rules.delete_after_s
        cutoff = now - timedelta(seconds=after) if after else None
        return [(sid, cutoff is not None and last < cutoff) for sid, last in rows]

    def run_once(self, now: datetime | None = None) -> Deleted:
        """One pass: delete what is past the age, then the oldest while above high water."""
        now = now or utcnow()
        total = Deleted()
        while True:
            batch = self.candidates(now)
            progressed = False
            for study_id, expired in batch:
                if not expired and not self._above_high_water():
                    continue
                one = self._delete(study_id)
                if one.studies:
                    progressed = True
                    total = Deleted(
                        total.studies + one.studies,
                        total.files + one.files,
                        total.bytes + one.bytes,
                    )
            if not progressed or len(batch) < 100:
                break
        if total.studies:
            log.info(
                "retention: deleted %d finished, delivered study(ies): %d file(s), %.1f MB",
                total.studies,
                total.files,
                total.bytes / 1e6,
            )
        elif self._above_high_water():
            log.warning(
                "retention: the disk is above retention.high_water_percent (%s %%) and no "
                "study can be deleted: every one left is unprocessed, failed or undelivered",
                self.rules.high_water_percent,
            )
        return total

    def _delete(self, study_id: int) -> Deleted:
        """Delete one study's rows (if it is still deletable), then its files."""
        with self.db.write() as session:
            study = session.execute(
                select(Study).where(Study.id == study_id, *_deletable()).with_for_update()
            ).scalar_one_or_none()
            if study is None:
                return Deleted()  # it changed meanwhile (a late instance, a requeue)
            uid = study.study_instance_uid
            instances = _paths(session, select(Instance.path).where(Instance.study_id == study_id))
            results = _paths(session, select(Delivery.path).where(Delivery.study_id == study_id))
            session.execute(delete(Study).where(Study.id == study_id))
        files = size = 0
        for root, relative in [(self.settings.instances_dir, p) for p in instances] + [
            (self.settings.results_dir, p) for p in results
        ]:
            path = root / relative
            with contextlib.suppress(FileNotFoundError):
                size += path.stat().st_size
                path.unlink()
                files += 1
                _remove_empty_parents(path.parent, root)
        log.info("retention: deleted study %s (%d file(s))", uid, files)
        return Deleted(1, files, size)


def _paths(session: Session, query: object) -> list[str]:
    return sorted({str(p) for p in session.scalars(query)})  # type: ignore[call-overload]


def _remove_empty_parents(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while empty."""
    root = root.resolve()
    folder = folder.resolve()
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): stop here
        folder = folder.parent


class RetentionThread:
    """Runs :meth:`Retention.run_once` every ``retention.check_interval_s`` until stopped."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.retention.run_once()
            except Exception:
                log.exception("retention pass failed; will retry")
            self._stop.wait(self.retention.rules.check_interval_s)

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 30) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
