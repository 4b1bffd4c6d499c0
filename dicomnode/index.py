"""The study index: what was received, recorded in the database.

:func:`record_instance` is the only writer of study, series and instance rows on
the receive path. It runs in one transaction, so an instance is either fully
indexed (with its study's completion deadlines moved) or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement

from dicomnode.config import CompletionSettings
from dicomnode.db import Database, Instance, Job, JobStatus, Series, Study, StudyState
from dicomnode.db.database import PreparedStatement
from dicomnode.queue.studies import study_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceMeta:
    """The few attributes of a received instance that the index keeps (DICOM keywords)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str
    Modality: str | None = None
    BodyPartExamined: str | None = None
    ViewPosition: str | None = None
    ImageType: str | None = None
    PhotometricInterpretation: str | None = None
    Rows: int | None = None
    Columns: int | None = None
    NumberOfFrames: int | None = None
    InstanceNumber: int | None = None
    SeriesDescription: str | None = None
    StudyDescription: str | None = None
    SeriesNumber: int | None = None
    PatientID: str | None = None
    AccessionNumber: str | None = None
    StudyDate: str | None = None
    ViewEvidence: str | None = None
    """AcquisitionDeviceProcessingDescription | ProtocolName | ViewCodeSequence meaning."""
    DerivedUIDs: tuple[str, ...] = ()
    """Keywords whose UID was missing and derived by the node (see ``receive.meta``)."""


@dataclass(frozen=True)
class Provenance:
    """Who sent an instance and what it became on disk."""

    calling_ae_title: str | None
    peer_host: str | None
    relative_path: str
    size_bytes: int


@dataclass(frozen=True)
class RecordOutcome:
    """What :func:`record_instance` did."""

    duplicate: bool
    """The SOP Instance was already indexed; its row now points at the new file."""
    study_state: str
    reopened: bool
    """A late instance re-opened a completed study (``late_instance_policy = reprocess``)."""
    superseded_path: str | None = None
    """A previous file of this SOP Instance at another path, to delete after commit."""


_STUDY = cast(Table, Study.__table__)
#: A new instance in a study in these states joins the analysis whatever the policy.
_NOT_YET_ANALYSED = (StudyState.COMPLETE, StudyState.QUEUED)
_SERIES = cast(Table, Series.__table__)
_INSTANCE = cast(Table, Instance.__table__)
_JOB = cast(Table, Job.__table__)

# record_instance runs inside every C-STORE's response time. Its statements are built
# once, with bound parameters, compiled once per dialect and run on the DBAPI cursor
# (see PreparedStatement): SQLAlchemy's per-execution work would cost more than the
# database itself.
_SELECT_STUDY = (
    select(_STUDY.c.id, _STUDY.c.state, _STUDY.c.quiet_until, _STUDY.c.reason)
    .where(_STUDY.c.study_instance_uid == bindparam("b_uid"))
    .with_for_update()
)
_SELECT_SERIES = select(_SERIES.c.id).where(_SERIES.c.series_instance_uid == bindparam("b_uid"))
_SELECT_INSTANCE = select(_INSTANCE.c.id, _INSTANCE.c.path).where(
    _INSTANCE.c.sop_instance_uid == bindparam("b_uid")
)
_UPDATE_INSTANCE = (
    update(_INSTANCE)
    .where(_INSTANCE.c.id == bindparam("b_id"))
    .values(times_received=_INSTANCE.c.times_received + 1)
)
_DISCARD_QUEUED = delete(_JOB).where(
    _JOB.c.study_id == bindparam("b_id"), _JOB.c.status == JobStatus.QUEUED
)
_PREPARED: dict[tuple[str, Hashable], PreparedStatement] = {}


def _prepared(
    dialect: Dialect,
    key: Hashable,
    build: Callable[[], ClauseElement],
    column_keys: Sequence[str] | None = None,
) -> PreparedStatement:
    """The statement ``build`` makes, compiled once per dialect and ``key``."""
    statement = _PREPARED.get((dialect.name, key))
    if statement is None:
        statement = PreparedStatement(
            build(), dialect, list(column_keys) if column_keys is not None else None
        )
        _PREPARED[(dialect.name, key)] = statement
    return statement


def _find_or_insert(
    cursor: Any,
    dialect: Dialect,
    find: ClauseElement,
    table: Any,
    key_column: str,
    values: dict[str, Any],
) -> tuple[Any, ...]:
    """The row ``find`` selects for ``values[key_column]``; if there is none, the row is
    inserted from ``values`` first (``ON CONFLICT DO NOTHING``, so two receivers
    creating it at once both end up with the same row)."""
    key = {"b_uid": values[key_column]}
    select_row = _prepared(dialect, ("select", table.name), lambda: find)
    row = select_row.first(cursor, key)
    if row is None:
        dialect_insert = pg_insert if dialect.name == "postgresql" else sqlite_insert
        _prepared(
            dialect,
            ("insert ignore", table.name),
            lambda: dialect_insert(table).on_conflict_do_nothing(index_elements=[key_column]),
            list(values),
        ).execute(cursor, values)
        row = select_row.first(cursor, key)
        if row is None:
            raise RuntimeError(f"{table.name} row {key['b_uid']!r} not found after inserting it")
    return row


def _study_row(
    cursor: Any,
    dialect: Dialect,
    meta: InstanceMeta,
    now: datetime,
    quiet: timedelta,
    force: timedelta,
) -> tuple[Any, ...]:
    """The study's (id, state, quiet_until, reason), created if new, locked for update."""
    return _find_or_insert(
        cursor,
        dialect,
        _SELECT_STUDY,
        _STUDY,
        "study_instance_uid",
        {
            "study_instance_uid": meta.StudyInstanceUID,
            "patient_id": meta.PatientID,
            "accession_number": meta.AccessionNumber,
            "study_date": meta.StudyDate,
            "study_description": meta.StudyDescription,
            "state": StudyState.RECEIVING,
            "first_received_at": now,
            "last_received_at": now,
            "quiet_until": now + quiet,
            "force_complete_at": now + force,
            "reopened_count": 0,
        },
    )


def _series_id(cursor: Any, dialect: Dialect, meta: InstanceMeta, study_id: int) -> int:
    """The series' row id, created if new."""
    row = _find_or_insert(
        cursor,
        dialect,
        _SELECT_SERIES,
        _SERIES,
        "series_instance_uid",
        {
            "study_id": study_id,
            "series_instance_uid": meta.SeriesInstanceUID,
            "modality": meta.Modality,
            "body_part_examined": meta.BodyPartExamined,
            "series_description": meta.SeriesDescription,
            "series_number": meta.SeriesNumber,
        },
    )
    return int(row[0])


def record_instance(
    db: Database,
    meta: InstanceMeta,
    provenance: Provenance,
    completion: CompletionSettings,
    now: datetime,
) -> RecordOutcome:
    """Index one stored instance and move its study's completion deadlines.

    One transaction of prepared statements (five in the usual case): this runs once
    per received instance, inside the C-STORE response time.
    """
    quiet = timedelta(seconds=completion.quiet_period_for(meta.Modality))
    force = timedelta(seconds=completion.force_complete_s)
    dialect = db.engine.dialect
    with db.write_cursor() as cursor:
        study_id, study_state, study_quiet_until, study_reason = _study_row(
            cursor, dialect, meta, now, quiet, force
        )
        series_id = _series_id(cursor, dialect, meta, study_id)
        existing = _prepared(dialect, "select instance", lambda: _SELECT_INSTANCE).first(
            cursor, {"b_uid": meta.SOPInstanceUID}
        )
        fields = {
            "series_id": series_id,
            "study_id": study_id,
            "sop_class_uid": meta.SOPClassUID,
            "transfer_syntax_uid": meta.TransferSyntaxUID,
            "instance_number": meta.InstanceNumber,
            "modality": meta.Modality,
            "body_part_examined": meta.BodyPartExamined,
            "view_position": meta.ViewPosition,
            "image_type": meta.ImageType,
            "view_evidence": meta.ViewEvidence,
            "photometric_interpretation": meta.PhotometricInterpretation,
            "rows": meta.Rows,
            "columns": meta.Columns,
            "number_of_frames": meta.NumberOfFrames,
            "calling_ae_title": provenance.calling_ae_title,
            "peer_host": provenance.peer_host,
            "received_at": now,
            "size_bytes": provenance.size_bytes,
            "path": provenance.relative_path,
        }
        superseded = None
        if existing is None:
            values = {"sop_instance_uid": meta.SOPInstanceUID, "times_received": 1, **fields}
            _prepared(dialect, "insert instance", lambda: insert(_INSTANCE), list(values)).execute(
                cursor, values
            )
        else:
            existing_id, existing_path = existing
            if existing_path != provenance.relative_path:
                superseded = existing_path
            _prepared(
                dialect, "update instance", lambda: _UPDATE_INSTANCE, ["b_id", *fields]
            ).execute(cursor, {"b_id": existing_id, **fields})

        changes: dict[str, Any] = {"last_received_at": now}
        reopened = False
        state = study_state
        if state == StudyState.RECEIVING:
            changes["quiet_until"] = max(study_quiet_until, now + quiet)
        elif existing is None and (
            state in _NOT_YET_ANALYSED or completion.late_instance_policy == "reprocess"
        ):
            # Analyse the study again once it is quiet, with the new instance in it.
            _prepared(dialect, "discard queued", lambda: _DISCARD_QUEUED).execute(
                cursor, {"b_id": study_id}
            )
            reopened = True
            state = StudyState.RECEIVING  # by study_update below: the study's one owner
            changes.update(
                completed_at=None,
                completion_reason=None,
                quiet_until=now + quiet,
                force_complete_at=now + force,
            )
        if meta.DerivedUIDs and not study_reason:
            changes["reason"] = (
                f"received without {' and '.join(meta.DerivedUIDs)}; the node derived them, "
                "so results for this study would not match any study in the PACS"
            )
        columns = tuple(changes)
        _prepared(
            dialect,
            ("update study", reopened, columns),
            lambda: (
                (study_update(StudyState.RECEIVING, _STUDY) if reopened else update(_STUDY))
                .where(_STUDY.c.id == bindparam("b_id"))
                # A re-opening also counts itself, incremented in SQL.
                .values(
                    **({"reopened_count": _STUDY.c.reopened_count + 1} if reopened else {}),
                    **{column: bindparam(column) for column in columns},
                )
            ),
        ).execute(cursor, {"b_id": study_id, **changes})

    if reopened:
        log.info("new instance re-opened %s study %s", study_state, meta.StudyInstanceUID)
    elif existing is None and state != StudyState.RECEIVING:
        log.info(
            "late instance stored in study %s, left %s (late_instance_policy = ignore)",
            meta.StudyInstanceUID,
            state,
        )
    return RecordOutcome(
        duplicate=existing is not None,
        study_state=state,
        reopened=reopened,
        superseded_path=superseded,
    )


@dataclass(frozen=True)
class StudySummary:
    """One line of ``dicomnode status``."""

    study_instance_uid: str
    state: str
    instances: int
    series: int
    modalities: list[str]
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    completion_reason: str | None
    reason: str | None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready mapping; times as ISO 8601 UTC."""
        out: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "state": self.state,
            "instances": self.instances,
            "series": self.series,
            "modalities": self.modalities,
            "first_received_at": self.first_received_at.isoformat(),
            "last_received_at": self.last_received_at.isoformat(),
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "completion_reason": self.completion_reason,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def recent_studies(db: Database, limit: int = 50) -> list[StudySummary]:
    """The most recently received studies with their instance counts."""
    with db.read() as session:
        counts = (
            select(
                Instance.study_id,
                func.count(Instance.id).label("instances"),
                func.count(func.distinct(Instance.series_id)).label("series"),
            )
            .group_by(Instance.study_id)
            .subquery()
        )
        rows = session.execute(
            select(Study, counts.c.instances, counts.c.series)
            .outerjoin(counts, counts.c.study_id == Study.id)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
            .limit(limit)
        ).all()
        modalities: dict[int, set[str]] = {}
        study_ids = [study.id for study, _, _ in rows]
        if study_ids:
            for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(study_ids))
            ):
                if modality:
                    modalities.setdefault(study_id, set()).add(modality)
        return [
            StudySummary(
                study_instance_uid=study.study_instance_uid,
                state=study.state,
                instances=n_instances or 0,
                series=n_series or 0,
                modalities=sorted(modalities.get(study.id, ())),
                first_received_at=study.first_received_at,
                last_received_at=study.last_received_at,
                completed_at=study.completed_at,
                completion_reason=study.completion_reason,
                reason=study.reason,
            )
            for study, n_instances, n_series in rows
        ]
