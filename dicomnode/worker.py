"""The worker loop: claim a job, run the study's pipeline, hand results to the outbox.

One :class:`Worker` per thread; the threads of a process share one pipeline
object, loaded once (models stay warm). While a job runs, a heartbeat thread
keeps its claim alive; if the worker freezes or dies, another worker reclaims
the job after ``queue.stalled_after_s`` (at once when the dead process was on
the same host).

The worker is the one place where DICOM I/O meets the pipeline: it reads the
study from the index into a :class:`StudyInput`, lets the pipeline work on
files and arrays, and writes the returned objects to the results directory
before they enter the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence

from sqlalchemy import select

from dicomnode import metrics
from dicomnode.config import Settings
from dicomnode.db import Database, Instance, Series, Study
from dicomnode.errors import is_retryable
from dicomnode.outcome import describe
from dicomnode.pipelines import InstanceInput, Pipeline, ResultObject, StudyInput
from dicomnode.queue import (
    ClaimedJob,
    OutboxItem,
    RetryPolicy,
    claim,
    fail,
    finish,
    heartbeat,
    reclaim_stalled,
    worker_identity,
)
from dicomnode.storage import InstanceStore, validate_uid

log = logging.getLogger("dicomnode.worker")

#: How often a worker looks for stalled jobs of other workers.
_RECLAIM_EVERY_S = 5.0


def load_study(db: Database, store: InstanceStore, job: ClaimedJob) -> StudyInput:
    """The study's instances as the pipeline sees them (paths and index tags).

    Raises :class:`~dicomnode.errors.InvalidUIDError` (not retried) when the study's or
    an instance's UID is empty or invalid: no result could be made for it.
    """
    validate_uid(job.study_instance_uid, "StudyInstanceUID")
    with db.read() as session:
        rows = session.execute(
            select(
                Instance,
                Series.series_instance_uid,
                Series.series_description,
                Study.study_description,
            )
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Instance.study_id)
            .where(Instance.study_id == job.study_id)
            .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
        ).all()
    return StudyInput(
        study_instance_uid=job.study_instance_uid,
        instances=tuple(
            InstanceInput(
                path=store.path_of(inst.path),
                sop_instance_uid=inst.sop_instance_uid,
                sop_class_uid=inst.sop_class_uid,
                series_instance_uid=series_uid,
                modality=inst.modality,
                body_part_examined=inst.body_part_examined,
                view_position=inst.view_position,
                image_type=inst.image_type,
                rows=inst.rows,
                columns=inst.columns,
                series_description=description,
                view_evidence=inst.view_evidence,
                study_description=study_description,
                relative_path=f"{store.root.name}/{inst.path}",
            )
            for inst, series_uid, description, study_description in rows
            if validate_uid(inst.sop_instance_uid, "SOPInstanceUID")
        ),
    )


class _Heartbeat:
    """Keeps one job's claim alive from a background thread."""

    def __init__(self, db: Database, job_id: int, worker: str, interval_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(db, job_id, worker, interval_s), daemon=True
        )
        self.lost = False

    def _run(self, db: Database, job_id: int, worker: str, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if not heartbeat(db, job_id, worker):
                    self.lost = True
                    log.warning("job %d is no longer held by %s", job_id, worker)
                    return
            except Exception:
                log.exception("heartbeat for job %d failed; will retry", job_id)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """Runs jobs one after another until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        pipeline: Pipeline,
        results: InstanceStore,
        instances: InstanceStore,
        name: str = "w0",
    ) -> None:
        self.settings = settings
        self.db = db
        self.pipeline = pipeline
        self.results = results
        self.instances = instances
        self.identity = worker_identity(name)
        self.policy = RetryPolicy(
            settings.queue.retry_backoff_s, settings.queue.retry_backoff_max_s
        )
        self.jobs_done = 0
        self._last_reclaim = 0.0

    def run(self, stop: threading.Event) -> None:
        """The loop: claim, run, repeat; sleep ``queue.poll_interval_s`` when idle."""
        log.info("worker %s started (pipeline %s)", self.identity, self.pipeline.name)
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                # The database may be briefly unreachable; never let the loop die.
                log.exception("worker %s: loop error; retrying", self.identity)
                worked = False
            if not worked:
                stop.wait(self.settings.queue.poll_interval_s)
        log.info("worker %s stopped after %d job(s)", self.identity, self.jobs_done)

    def run_once(self) -> bool:
        """Claim and run at most one job; True if there was one."""
        now = time.monotonic()
        if now - self._last_reclaim >= _RECLAIM_EVERY_S:
            self._last_reclaim = now
            reclaim_stalled(self.db, self.settings.queue)
        job = claim(self.db, self.identity)
        if job is None:
            return False
        log.info(
            "job %d: study %s, attempt %d/%d",
            job.id,
            job.study_instance_uid,
            job.attempts,
            job.max_attempts,
        )
        started = time.perf_counter()
        with _Heartbeat(
            self.db, job.id, self.identity, self.settings.queue.heartbeat_interval_s
        ) as beat:
            try:
                study = load_study(self.db, self.instances, job)
                outcome = self.pipeline.run(study)
                # Imported here: highdicom and OpenCV are for workers, not for the
                # receiving processes that import this module through serve.
                from dicomnode.results.encode import encode

                objects = encode(outcome, study, self.settings.outputs)
                items = self._store_results(job, objects)
            except Exception as exc:
                # Only outages (database, network, memory) are retried; the same input
                # fails the same way again, so anything else fails the job at once.
                retryable = is_retryable(exc)
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                log.error(
                    "job %d failed (%s): %s\n%s",
                    job.id,
                    "retryable" if retryable else "not retried",
                    detail,
                    traceback.format_exc(),
                )
                status = fail(self.db, job, self.identity, detail, self.policy, retryable=retryable)
                metrics.job_finished(self.pipeline.name, "error", time.perf_counter() - started)
                log.info("job %d is now %s", job.id, status or "held by another worker")
                return True
        if beat.lost:
            log.warning("job %d was reclaimed while it ran; its results are discarded", job.id)
            return True
        summary = dict(outcome.summary)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["pipeline_version"] = self.pipeline.version
        destinations = [d.name for d in self.settings.destinations]
        if finish(
            self.db,
            job,
            self.identity,
            items,
            destinations,
            summary,
            skipped_reason=outcome.skipped_reason,
            note=outcome.note,
        ):
            self.jobs_done += 1
            metrics.job_finished(
                self.pipeline.name,
                "skipped" if outcome.skipped_reason else "done",
                summary["seconds"],
            )
            found = describe(summary) + (
                [f"skipped: {outcome.skipped_reason}"] if outcome.skipped_reason else []
            )
            log.info(
                "job %d done: study %s%s; %d result object(s) for %d destination(s)",
                job.id,
                job.study_instance_uid,
                f": {'; '.join(found)}" if found else "",
                len(items),
                len(destinations),
            )
        else:
            log.warning("job %d was reclaimed while it ran; its results are discarded", job.id)
        return True

    def _store_results(
        self, job: ClaimedJob, objects: Sequence[ResultObject]
    ) -> Sequence[OutboxItem]:
        """Write each result object durably under ``results/<StudyUID>/<SOPInstanceUID>.dcm``."""
        items = []
        for obj in objects:
            relative = (
                f"{validate_uid(job.study_instance_uid)}/"
                f"{validate_uid(obj.sop_instance_uid, 'result SOPInstanceUID')}.dcm"
            )
            self.results.write(obj.data, relative)
            items.append(OutboxItem(obj.sop_instance_uid, obj.sop_class_uid, relative))
        return items
