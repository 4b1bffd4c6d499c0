"""Study state: its one owner. Every change of ``study.state`` is made by a statement
from :func:`study_update` (run by :func:`move_study`, or prepared once by the receive
path's index write), which only moves a study along :data:`STUDY_TRANSITIONS`.

::

    receiving ──complete──▶ complete ──enqueue──▶ queued ──claim──▶ processing
        ▲                       ▲                    ▲                  │
        │ new instance          │ requeue            └── retry/reclaim ─┤
        │ (re-open)             │                                     ▼
        └────────── any other state ◀── done | skipped | failed ◀── finish / fail
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Update, or_, update
from sqlalchemy.orm import Session

from dicomnode.db import Study, StudyState

_ANY = frozenset(StudyState)

#: For each state, the states a study may enter it from (anything else is refused).
STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    # A new instance re-opens a study in any other state (index.record_instance; the
    # late-instance policy decides whether an analysed study is re-opened).
    StudyState.RECEIVING: _ANY - {StudyState.RECEIVING},
    # The quiet period or the age limit passed (completion); an operator's requeue of
    # a study that is not receiving and has no queued or running job.
    StudyState.COMPLETE: _ANY - {StudyState.COMPLETE},
    # An analysis was queued (enqueue), or a failed attempt will be retried, or a
    # stalled worker's job was taken back.
    StudyState.QUEUED: frozenset(
        {StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING}
    ),
    StudyState.PROCESSING: frozenset({StudyState.QUEUED}),
    StudyState.DONE: frozenset({StudyState.PROCESSING}),
    StudyState.SKIPPED: frozenset({StudyState.PROCESSING}),
    StudyState.FAILED: frozenset({StudyState.PROCESSING}),
}


def study_update(to: StudyState, table: Any = Study) -> Update:
    """``UPDATE study SET state = <to> WHERE state IN (<allowed from>)``: the one statement
    that changes a study's state. Add the study's ``WHERE`` and any other ``values``.

    ``table`` is the ORM class (default) or its Core table (for a prepared statement).
    The allowed states are literal comparisons, not an expanding ``IN``, so the statement
    can be compiled once and run on a DBAPI cursor.
    """
    state = table.state if table is Study else table.c.state
    allowed = sorted(STUDY_TRANSITIONS[to])
    return update(table).where(or_(*(state == s.value for s in allowed))).values(state=to.value)


def move_study(
    session: Session,
    study_id: int,
    to: StudyState,
    only_from: StudyState | None = None,
    **values: Any,
) -> bool:
    """Move one study to ``to`` (with ``values``, e.g. its ``reason``) if its current state
    allows it (and is ``only_from``, when given); False, and nothing changed, otherwise."""
    if only_from is not None and only_from not in STUDY_TRANSITIONS[to]:
        raise ValueError(f"a study never moves from {only_from} to {to}")
    statement = study_update(to).where(Study.id == study_id)
    if only_from is not None:
        statement = statement.where(Study.state == only_from.value)
    if values:
        statement = statement.values(**values)
    return session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
