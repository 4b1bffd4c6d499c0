"""What the status page and the gauges show, read from the database (read-only).

Plain SQLAlchemy selects on :mod:`dicomnode.db` models in a read session; nothing
here writes. Patient identifiers (Patient ID, Accession Number) are included only
when ``node.log_phi`` is true, as for the logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select

from dicomnode.config import Settings
from dicomnode.db import Database, Delivery, Instance, Job, Series, Study
from dicomnode.inference.registry import ModelError, read_manifest
from dicomnode.outcome import describe


@dataclass(frozen=True)
class ResultLink:
    """One result object of a study: what it is and where to fetch it."""

    sop_instance_uid: str
    kind: str
    href: str


@dataclass
class StudyRow:
    """One study on the page."""

    study_instance_uid: str
    state: str
    reason: str | None
    instances: int
    modalities: list[str]
    last_received_at: datetime
    patient_id: str | None = None
    accession_number: str | None = None
    findings: list[str] = field(default_factory=list)
    results: list[ResultLink] = field(default_factory=list)


@dataclass(frozen=True)
class ModelRow:
    """One configured model: its manifest's identity and whether it has a card."""

    name: str
    version: str
    task: str
    has_card: bool
    problem: str | None = None


#: SOP Class UIDs of the node's result objects, by a word for the page.
_RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.34": "SR (Comprehensive 3D)",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR (Comprehensive)",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}


def counts_by_status(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """(jobs, deliveries) counted by status."""
    with db.read() as session:
        jobs = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        deliveries = dict(
            session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
        )
    return {str(k): int(v) for k, v in jobs.items()}, {
        str(k): int(v) for k, v in deliveries.items()
    }


def _findings(summary_json: str | None) -> list[str]:
    """What a job's recorded summary says, in words (see :mod:`dicomnode.outcome`)."""
    if not summary_json:
        return []
    try:
        summary = json.loads(summary_json)
    except ValueError:
        return []
    return describe(summary) if isinstance(summary, dict) else []


def findings(db: Database, study_instance_uids: list[str]) -> dict[str, list[str]]:
    """What the newest analysis of each study found, in words (studies without one left out)."""
    if not study_instance_uids:
        return {}
    summaries: dict[str, str | None] = {}
    with db.read() as session:
        for uid, summary in session.execute(
            select(Study.study_instance_uid, Job.summary)
            .join(Job, Job.study_id == Study.id)
            .where(Study.study_instance_uid.in_(study_instance_uids), Job.summary.is_not(None))
            .order_by(Job.id)
        ):
            summaries[uid] = summary
    return {uid: lines for uid, summary in summaries.items() if (lines := _findings(summary))}


def recent_studies(db: Database, settings: Settings, limit: int = 50) -> list[StudyRow]:
    """The most recently received studies with state, reason, findings and result links."""
    with db.read() as session:
        counts = (
            select(Instance.study_id, func.count(Instance.id).label("n"))
            .group_by(Instance.study_id)
            .subquery()
        )
        rows = session.execute(
            select(Study, counts.c.n)
            .outerjoin(counts, counts.c.study_id == Study.id)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
            .limit(limit)
        ).all()
        ids = [study.id for study, _ in rows]
        modalities: dict[int, set[str]] = {}
        results: dict[int, dict[str, str]] = {}
        if ids:
            for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(ids))
            ):
                if modality:
                    modalities.setdefault(study_id, set()).add(modality)
            for study_id, sop_uid, sop_class in session.execute(
                select(Delivery.study_id, Delivery.sop_instance_uid, Delivery.sop_class_uid)
                .where(Delivery.study_id.in_(ids))
                .distinct()
            ):
                results.setdefault(study_id, {})[sop_uid] = sop_class
    found = findings(db, [study.study_instance_uid for study, _ in rows])
    phi = settings.node.log_phi
    out = []
    for study, n in rows:
        uid = study.study_instance_uid
        out.append(
            StudyRow(
                study_instance_uid=uid,
                state=study.state,
                reason=study.reason,
                instances=int(n or 0),
                modalities=sorted(modalities.get(study.id, ())),
                last_received_at=study.last_received_at,
                patient_id=study.patient_id if phi else None,
                accession_number=study.accession_number if phi else None,
                findings=found.get(uid, []),
                results=_result_links(settings, uid, results.get(study.id, {})),
            )
        )
    return out


def _result_links(settings: Settings, uid: str, known: dict[str, str]) -> list[ResultLink]:
    """The study's result objects: those in the outbox and those on disk (no destination)."""
    classes = dict(known)
    folder = settings.results_dir / uid
    if folder.is_dir():
        for path in folder.glob("*.dcm"):
            if path.stem not in classes:
                try:
                    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                    classes[path.stem] = str(header.get("SOPClassUID", "?"))
                except (InvalidDicomError, OSError):
                    continue
    return [
        ResultLink(sop, _RESULT_KINDS.get(cls, cls), f"/results/{uid}/{sop}.dcm")
        for sop, cls in sorted(classes.items())
    ]


def failed_jobs(db: Database, limit: int = 20) -> list[dict[str, Any]]:
    """Jobs that failed after every attempt, newest first, with their last error."""
    with db.read() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Job.attempts, Job.last_error, Job.finished_at)
            .join(Study, Study.id == Job.study_id)
            .where(Job.status == "failed")
            .order_by(Job.id.desc())
            .limit(limit)
        ).all()
    return [
        {"study_instance_uid": uid, "attempts": attempts, "error": error, "finished_at": at}
        for uid, attempts, error, at in rows
    ]


def running_jobs(db: Database) -> list[dict[str, Any]]:
    """Jobs a worker runs now."""
    with db.read() as session:
        rows = session.execute(
            select(Study.study_instance_uid, Job.worker, Job.started_at, Job.attempts)
            .join(Study, Study.id == Job.study_id)
            .where(Job.status == "running")
            .order_by(Job.started_at)
        ).all()
    return [
        {"study_instance_uid": uid, "worker": worker, "started_at": at, "attempt": attempts}
        for uid, worker, at, attempts in rows
    ]


def undelivered(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """Deliveries not (yet) done: pending with their retries, and failed ones."""
    with db.read() as session:
        rows = session.execute(
            select(
                Delivery.sop_instance_uid,
                Delivery.destination,
                Delivery.status,
                Delivery.attempts,
                Delivery.last_status,
                Delivery.last_error,
                Delivery.next_attempt_at,
            )
            .where(Delivery.status != "delivered")
            .order_by(Delivery.id.desc())
            .limit(limit)
        ).all()
    return [
        {
            "sop_instance_uid": sop,
            "destination": destination,
            "status": status,
            "attempts": attempts,
            "last_status": None if last_status is None else f"{last_status:#06x}",
            "last_error": error,
            "next_attempt_at": next_at,
        }
        for sop, destination, status, attempts, last_status, error, next_at in rows
    ]


def configured_models(settings: Settings) -> list[ModelRow]:
    """The models the configured pipeline uses, from their manifests."""
    pipeline = settings.worker.pipeline
    wanted: list[tuple[Path, str]] = []
    if pipeline in ("cxr", "chest"):
        c = settings.cxr
        names = [
            c.lung_mask,
            *c.members,
            c.stacking if c.strategy == "stacking" else "",
            c.detector,
        ]
        wanted += [(c.models_dir, n) for n in names if n]
    if pipeline in ("ct", "chest"):
        wanted += [
            (settings.ct.models_dir, n)
            for n in (settings.ct.classifier, settings.ct.lung_mask)
            if n
        ]
    rows = []
    for models_dir, name in wanted:
        try:
            spec = read_manifest(models_dir / name / "manifest.toml")
        except ModelError as exc:
            rows.append(ModelRow(name, "?", "?", False, str(exc)))
            continue
        rows.append(
            ModelRow(name, spec.version, spec.task, (models_dir / name / "MODEL_CARD.md").is_file())
        )
    return rows


def model_card(settings: Settings, name: str) -> str | None:
    """The MODEL_CARD.md text of a configured model, or None for any other name."""
    for models_dir in (settings.cxr.models_dir, settings.ct.models_dir):
        if name in {m.name for m in configured_models(settings)}:
            path = models_dir / name / "MODEL_CARD.md"
            if path.is_file():
                return path.read_text(encoding="utf-8", errors="replace")
    return None
