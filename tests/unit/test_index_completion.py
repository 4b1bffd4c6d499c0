"""Index and completion on SQLite and on a real PostgreSQL started by the suite."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from dicomnode.completion import complete_due_studies
from dicomnode.config import CompletionSettings
from dicomnode.db import Database, Instance, Series, Study, StudyState, utcnow
from dicomnode.index import InstanceMeta, Provenance, recent_studies, record_instance

COMPLETION = CompletionSettings(
    quiet_period_s={"CR": 10.0, "CT": 60.0, "default": 30.0},
    force_complete_s=3600.0,
    check_interval_s=1.0,
    late_instance_policy="reprocess",
)


def _meta(study: str, series: str, sop: str, modality: str = "CT") -> InstanceMeta:
    return InstanceMeta(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID=sop,
        SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
        TransferSyntaxUID="1.2.840.10008.1.2.1",
        Modality=modality,
        BodyPartExamined="CHEST",
        ViewPosition=None,
        ImageType="ORIGINAL\\PRIMARY\\AXIAL",
        Rows=512,
        Columns=512,
    )


def _prov(sop: str) -> Provenance:
    return Provenance("STORESCU", "127.0.0.1", f"1/2/{sop}.dcm", 1234)


@pytest.fixture
def db(db: Database) -> Database:
    """The migrated database, migrated once more: migrations are idempotent."""
    db.migrate()
    return db


def test_record_instances_and_duplicates(db: Database) -> None:
    now = utcnow()
    out = record_instance(db, _meta("1.1", "1.1.1", "1.1.1.1"), _prov("a"), COMPLETION, now)
    assert not out.duplicate and out.study_state == StudyState.RECEIVING
    record_instance(db, _meta("1.1", "1.1.1", "1.1.1.2"), _prov("b"), COMPLETION, now)
    again = record_instance(db, _meta("1.1", "1.1.1", "1.1.1.1"), _prov("a"), COMPLETION, now)
    assert again.duplicate
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 2
        assert s.scalar(select(func.count()).select_from(Series)) == 1
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == "1.1.1.1")).one()
        assert inst.times_received == 2
        assert inst.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
        assert inst.calling_ae_title == "STORESCU"
        assert inst.received_at.tzinfo is not None
    [summary] = recent_studies(db)
    assert summary.instances == 2 and summary.series == 1 and summary.modalities == ["CT"]


def test_prepared_statements_store_what_the_orm_reads_back(db: Database) -> None:
    """record_instance writes through the DBAPI cursor (PreparedStatement): every value,
    times included, must read back through the ORM as given."""
    from datetime import datetime, timezone

    local = timezone(timedelta(hours=2))
    now = datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=local)  # not UTC on purpose
    meta = InstanceMeta(
        StudyInstanceUID="7.1",
        SeriesInstanceUID="7.1.1",
        SOPInstanceUID="7.1.1.1",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
        TransferSyntaxUID="1.2.840.10008.1.2.4.50",
        Modality="CR",
        ViewPosition="PA",
        PhotometricInterpretation="MONOCHROME2",
        Rows=2048,
        Columns=1536,
        NumberOfFrames=None,
        InstanceNumber=3,
        SeriesDescription="Chest PA",
        SeriesNumber=2,
        PatientID="P-1",
        AccessionNumber="A-9",
        StudyDate="20261122",
        DerivedUIDs=("SeriesInstanceUID",),
    )
    record_instance(db, meta, Provenance("MODALITY", "10.0.0.7", "7/1/1.dcm", 987), COMPLETION, now)
    with db.read() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == "7.1")).one()
        series = s.scalars(select(Series).where(Series.study_id == study.id)).one()
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == "7.1.1.1")).one()
    assert study.first_received_at == study.last_received_at == now
    assert study.quiet_until == now + timedelta(seconds=10)  # CR's quiet period
    assert study.force_complete_at == now + timedelta(seconds=3600)
    assert study.quiet_until.utcoffset() == timedelta(0)  # read back as aware UTC
    assert (study.patient_id, study.accession_number, study.study_date) == (
        "P-1",
        "A-9",
        "20261122",
    )
    assert study.state == StudyState.RECEIVING and study.reopened_count == 0
    assert study.reason and "SeriesInstanceUID" in study.reason
    assert (series.series_instance_uid, series.modality, series.series_description) == (
        "7.1.1",
        "CR",
        "Chest PA",
    )
    assert series.series_number == 2
    assert (inst.series_id, inst.study_id, inst.received_at) == (series.id, study.id, now)
    assert (inst.rows, inst.columns, inst.number_of_frames, inst.instance_number) == (
        2048,
        1536,
        None,
        3,
    )
    assert (inst.view_position, inst.transfer_syntax_uid, inst.path, inst.size_bytes) == (
        "PA",
        "1.2.840.10008.1.2.4.50",
        "7/1/1.dcm",
        987,
    )
    assert (inst.calling_ae_title, inst.peer_host, inst.times_received) == (
        "MODALITY",
        "10.0.0.7",
        1,
    )
    # A later instance moves quiet_until on, never back.
    later = now + timedelta(seconds=4)
    record_instance(db, _meta("7.1", "7.1.1", "7.1.1.2", "CR"), _prov("x"), COMPLETION, later)
    with db.read() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == "7.1")).one()
    assert study.last_received_at == later
    assert study.quiet_until == later + timedelta(seconds=10)


def test_a_failed_write_cursor_transaction_leaves_nothing(db: Database) -> None:
    from sqlalchemy import insert

    from dicomnode.db.database import PreparedStatement

    statement = PreparedStatement(
        insert(Series.__table__), db.engine.dialect, ["study_id", "series_instance_uid"]
    )
    record_instance(db, _meta("8.1", "8.1.1", "8.1.1.1"), _prov("y"), COMPLETION, utcnow())
    with db.read() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == "8.1"))
    with pytest.raises(RuntimeError, match="after the insert"), db.write_cursor() as cursor:
        statement.execute(cursor, {"study_id": study_id, "series_instance_uid": "8.1.2"})
        raise RuntimeError("after the insert")
    with db.read() as s:
        uids = s.scalars(select(Series.series_instance_uid).where(Series.study_id == study_id))
        assert list(uids) == ["8.1.1"]


def test_quiet_period_per_modality_and_completion(db: Database) -> None:
    t0 = utcnow()
    record_instance(db, _meta("2.1", "2.1.1", "2.1.1.1", "CR"), _prov("c"), COMPLETION, t0)
    record_instance(db, _meta("2.2", "2.2.1", "2.2.1.1", "CT"), _prov("d"), COMPLETION, t0)
    assert complete_due_studies(db, t0 + timedelta(seconds=9)) == []
    done = complete_due_studies(db, t0 + timedelta(seconds=11))
    assert [(d.study_instance_uid, d.reason) for d in done] == [("2.1", "quiet")]
    # A new CT instance at t0+50 pushes the CT study's deadline to t0+110.
    t1 = t0 + timedelta(seconds=50)
    record_instance(db, _meta("2.2", "2.2.1", "2.2.1.2", "CT"), _prov("e"), COMPLETION, t1)
    assert complete_due_studies(db, t0 + timedelta(seconds=100)) == []
    done = complete_due_studies(db, t0 + timedelta(seconds=111))
    assert [d.study_instance_uid for d in done] == ["2.2"]
    # Completed once only.
    assert complete_due_studies(db, t0 + timedelta(seconds=500)) == []


def test_force_complete_age(db: Database) -> None:
    settings = CompletionSettings(quiet_period_s={"default": 10.0}, force_complete_s=12.0)
    t0 = utcnow()
    # Instances keep arriving every 5 s, so the 10 s quiet period never passes.
    for i in range(3):
        record_instance(
            db,
            _meta("3.1", "3.1.1", f"3.1.1.{i + 1}", "CR"),
            _prov(str(i)),
            settings,
            t0 + timedelta(seconds=5 * i),
        )
    assert complete_due_studies(db, t0 + timedelta(seconds=11)) == []
    done = complete_due_studies(db, t0 + timedelta(seconds=13))
    assert [(d.study_instance_uid, d.reason) for d in done] == [("3.1", "forced")]


@pytest.mark.parametrize("policy", ["reprocess", "ignore"])
def test_late_instance_policy(db: Database, policy: str) -> None:
    settings = CompletionSettings(
        quiet_period_s=COMPLETION.quiet_period_s,
        force_complete_s=3600.0,
        late_instance_policy=policy,
    )
    t0 = utcnow()
    record_instance(db, _meta("4.1", "4.1.1", "4.1.1.1", "CR"), _prov("f"), settings, t0)
    complete_due_studies(db, t0 + timedelta(seconds=11))
    with db.write() as s:  # the analysis ran
        s.execute(update(Study).values(state=StudyState.DONE))
    # The same instance again is a duplicate and never re-opens the study.
    dup = record_instance(
        db, _meta("4.1", "4.1.1", "4.1.1.1", "CR"), _prov("f"), settings, t0 + timedelta(seconds=20)
    )
    assert dup.duplicate and not dup.reopened and dup.study_state == StudyState.DONE
    late = record_instance(
        db, _meta("4.1", "4.1.1", "4.1.1.2", "CR"), _prov("g"), settings, t0 + timedelta(seconds=30)
    )
    if policy == "reprocess":
        assert late.reopened and late.study_state == StudyState.RECEIVING
        done = complete_due_studies(db, t0 + timedelta(seconds=41))
        assert [d.study_instance_uid for d in done] == ["4.1"]
        with db.read() as s:
            assert s.scalars(select(Study.reopened_count)).one() == 1
    else:
        assert not late.reopened and late.study_state == StudyState.DONE
    [summary] = recent_studies(db)
    assert summary.instances == 2


def test_new_instance_before_analysis_always_rejoins_the_study(db: Database) -> None:
    """Complete but not analysed yet: a new instance re-opens it even with policy 'ignore'."""
    settings = CompletionSettings(
        quiet_period_s=COMPLETION.quiet_period_s, late_instance_policy="ignore"
    )
    t0 = utcnow()
    record_instance(db, _meta("7.1", "7.1.1", "7.1.1.1", "CR"), _prov("h"), settings, t0)
    complete_due_studies(db, t0 + timedelta(seconds=11))
    late = record_instance(
        db, _meta("7.1", "7.1.1", "7.1.1.2", "CR"), _prov("i"), settings, t0 + timedelta(seconds=12)
    )
    assert late.reopened and late.study_state == StudyState.RECEIVING


def test_concurrent_writers_index_everything_once(db: Database) -> None:
    """8 threads store 25 instances each into 2 studies at once: no lost or doubled rows."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                study = f"5.{i % 2}"
                record_instance(
                    db,
                    _meta(study, f"{study}.{n % 3}", f"5.9.{n}.{i}"),
                    _prov(f"{n}-{i}"),
                    COMPLETION,
                    utcnow(),
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 200
        assert s.scalar(select(func.count()).select_from(Study)) == 2
        assert s.scalar(select(func.count()).select_from(Series)) == 6


def test_concurrent_completion_checks_complete_each_study_once(db: Database) -> None:
    t0 = utcnow()
    for i in range(20):
        record_instance(
            db, _meta(f"6.{i}", f"6.{i}.1", f"6.{i}.1.1", "CR"), _prov(str(i)), COMPLETION, t0
        )
    later = t0 + timedelta(seconds=11)
    results: list[list[str]] = []

    def check() -> None:
        results.append([d.study_instance_uid for d in complete_due_studies(db, later)])

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    completed = [uid for batch in results for uid in batch]
    assert sorted(completed) == sorted(f"6.{i}" for i in range(20))


def test_the_descriptions_reach_the_pipeline_and_route_a_dental_panoramic(
    db: Database, tmp_path
) -> None:
    """StudyDescription and SeriesDescription are indexed and given to routing, which skips
    a CR with no BodyPartExamined whose descriptions say TEETH."""
    from dataclasses import replace

    from dicomnode.config import RoutingSettings
    from dicomnode.queue.jobs import ClaimedJob
    from dicomnode.routing import NOT_CHEST, route_cxr
    from dicomnode.storage import InstanceStore
    from dicomnode.worker import load_study

    meta = replace(
        _meta("1.9", "1.9.1", "1.9.1.1", modality="CR"),
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
        BodyPartExamined=None,
        ImageType=None,
        StudyDescription="OPG TEETH",
        SeriesDescription="Panoramic teeth",
    )
    record_instance(db, meta, _prov("1.9.1.1"), COMPLETION, utcnow())
    with db.read() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == "1.9"))
        assert s.scalar(select(Study.study_description)) == "OPG TEETH"
    store = InstanceStore(tmp_path / "instances", tmp_path / "incoming", 0)
    job = ClaimedJob(1, "analyse", int(study_id), "1.9", 1, 3, 0)
    (instance,) = load_study(db, store, job).instances
    assert instance.study_description == "OPG TEETH"
    assert instance.series_description == "Panoramic teeth"
    route = route_cxr([instance], RoutingSettings())
    assert route.instances == () and route.skipped[0].code == NOT_CHEST
    assert route.skipped[0].detail == "description says OPG"
