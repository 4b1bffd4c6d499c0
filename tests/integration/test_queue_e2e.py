"""The queue end to end: crashes, several worker processes, failures, frozen workers."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fixture_pipelines import result_uid
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from support import (
    dcmtk,
    make_instance,
    node_env,
    queue_studies,
    running_node,
    storescu,
    write_config,
)

from dicomnode.config import load_settings
from dicomnode.db import Database, Delivery, Job, JobStatus, Study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PIPELINE = {"pipeline": "fixture_pipelines:slow", "processes": 1}
DESTINATIONS = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]


def _send_until_killed(files: list[Path], port: int, kill: Any, after_acks: int) -> set[str]:
    """storescu sends ``files``; ``kill()`` runs once ``after_acks`` were acknowledged.

    Returns the paths storescu saw Success for.
    """
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-v", "-xe", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    acknowledged: list[str] = []
    current: list[str] = []

    def read() -> None:
        assert sender.stdout is not None
        for line in sender.stdout:
            m = re.search(r"Sending file: (\S+)", line)
            if m:
                current[:] = [m.group(1)]
            elif "Received Store Response (Success)" in line and current:
                acknowledged.append(current[0])

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < after_acks and time.monotonic() < deadline:
        if sender.poll() is not None:
            break
        time.sleep(0.002)
    kill()
    sender.wait(30)
    reader.join(10)
    return set(acknowledged)


def _db(node: Any) -> Database:
    return Database(load_settings(node.config).database.url)


def test_sigkill_while_receiving_and_while_processing_loses_nothing_and_runs_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(20261121)
    rounds = 6  # two kill points each: 12 in all
    studies: dict[str, list[Path]] = {}
    with running_node(
        tmp_path / "node",
        worker=PIPELINE,
        quiet_period_s={"CT": 3.0},
        destinations=DESTINATIONS,
        # Killed workers are reclaimed at once (dead process on this host); a long stall
        # timeout keeps a busy CI machine's late heartbeats from counting as deaths. A job
        # re-run after one kill can be running at the next kill too: the 12 deliberate kills
        # must not reach the poison-job cap (max_attempts + 2 worker deaths).
        queue={"heartbeat_interval_s": 0.5, "stalled_after_s": 20, "max_attempts": 10},
    ) as node:
        marks = tmp_path / "processing"  # the slow pipeline marks each study it starts
        marks.mkdir()
        node.env = {"DICOMNODE_TEST_DELAY_S": "1.5", "DICOMNODE_TEST_MARK_DIR": str(marks)}
        node.stop()
        node.start()
        kills = 0
        for r in range(rounds):
            uid = generate_uid()
            files = [
                make_instance(tmp_path / "in" / str(r), study_uid=uid, rows=128, columns=128)
                for _ in range(25)
            ]
            studies[uid] = files
            # Kill point 1: in the middle of receiving.
            acked = _send_until_killed(files, node.port, node.kill, after_acks=rng.randint(1, 20))
            kills += 1
            node.start()
            stored = _instance_paths(node)
            for path in acked:
                assert Path(path).stem in stored, f"acknowledged {path} lost after SIGKILL"
            # The modality sends the rest again, as a real one retries.
            rest = [f for f in files if str(f) not in acked]
            for run in storescu(rest, node.port):
                assert run.returncode == 0, run.stdout + run.stderr
            # Kill point 2: while the worker runs the (slow) pipeline on this study. (The
            # mark file, not `status`: a CLI call can take longer than the 1.5 s window on
            # a loaded machine.)
            deadline = time.monotonic() + 30
            while not (marks / uid).exists():
                assert time.monotonic() < deadline, f"{uid} was not processed within 30 s"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.2))
            node.kill()
            kills += 1
            node.start()
        assert kills >= 10
        node.wait_for(
            lambda s: all(s.get(u, {}).get("state") == "done" for u in studies),
            120,
            "every study done",
        )
        db = _db(node)
        with db.read() as session:
            for uid in studies:
                study_id, reopened = session.execute(
                    select(Study.id, Study.reopened_count).where(Study.study_instance_uid == uid)
                ).one()
                jobs = session.execute(
                    select(Job.status, Job.attempts, Job.stalls, Job.last_error).where(
                        Job.study_id == study_id
                    )
                ).all()
                # At most one analysis per completion: a study that completed on the instances
                # received before a kill, and re-opened when the rest arrived, is analysed once
                # more; unless its job was still queued (not yet run, or taken back from a
                # killed worker) when the study re-opened: that job is discarded (index), so
                # the study has fewer jobs than completions. Every job it has ran to the end.
                statuses = [j.status for j in jobs]
                assert 1 <= len(statuses) <= reopened + 1, (uid, reopened, jobs)
                assert set(statuses) == {JobStatus.DONE}, (uid, jobs)
                rows = session.execute(
                    select(Delivery.sop_instance_uid, Delivery.destination).where(
                        Delivery.study_id == study_id
                    )
                ).all()
                assert rows == [(result_uid(uid), "pacs")]
            assert (
                session.scalar(
                    select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING)
                )
                == 0
            )
        status = node.studies()
        for uid, files in studies.items():
            assert status[uid]["instances"] == len(files)
            assert (node.data_dir / "results" / uid / f"{result_uid(uid)}.dcm").is_file()


def _instance_paths(node: Any) -> set[str]:
    return {p.stem for p in (node.data_dir / "instances").rglob("*.dcm")}


def _start_worker(config: Path, log: Path, delay: str = "0.1") -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=node_env({"DICOMNODE_TEST_DELAY_S": delay}),
    )


def test_three_worker_processes_on_postgresql_share_50_studies(
    tmp_path: Path, postgres: Any
) -> None:
    url = postgres.create_database()
    config = write_config(
        tmp_path,
        1,
        database={"url": url},
        worker={"pipeline": "fixture_pipelines:slow", "threads": 1},
        destinations=DESTINATIONS,
    )
    settings = load_settings(config)
    db = Database(url)
    db.migrate()
    uids = queue_studies(db, settings, 50)
    workers = [_start_worker(config, tmp_path / f"worker{i}.log") for i in range(3)]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with db.read() as s:
                done = s.scalar(select(func.count()).where(Job.status == JobStatus.DONE))
            if done == 50:
                break
            time.sleep(0.3)
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in workers]
    assert codes == [0, 0, 0]
    with db.read() as s:
        jobs = s.execute(select(Job.study_id, Job.status, Job.worker, Job.attempts)).all()
        deliveries = s.scalars(select(Delivery.sop_instance_uid)).all()
        by_uid = dict(s.execute(select(Study.id, Study.study_instance_uid)).all())
    assert len(jobs) == 50
    assert all(j.status == JobStatus.DONE and j.attempts == 1 for j in jobs)
    assert sorted(by_uid[j.study_id] for j in jobs) == sorted(uids)
    assert sorted(deliveries) == sorted(result_uid(u) for u in uids)
    pids = {j.worker.split(":")[1] for j in jobs}
    assert pids == {str(p.pid) for p in workers}, "work was not spread over the 3 workers"


def test_a_job_that_always_fails_ends_failed_and_requeue_brings_it_back(tmp_path: Path) -> None:
    with running_node(
        tmp_path / "node",
        worker={"pipeline": "fixture_pipelines:failing", "processes": 1},
        queue={"max_attempts": 2, "retry_backoff_s": 0.5},
    ) as node:
        uid = generate_uid()
        [run] = storescu([make_instance(tmp_path / "in", study_uid=uid)], node.port)
        assert run.returncode == 0
        node.wait_for(lambda s: s.get(uid, {}).get("state") == "failed", 60, "study failed")
        status = node.status()
        [failed] = [f for f in status["failed"] if f["study_instance_uid"] == uid]
        assert failed["attempts"] == 2
        assert f"fixture failure for {uid}" in failed["reason"]
        assert f"fixture failure for {uid}" in node.studies()[uid]["reason"]
        text = node.cli("status")
        assert "failed" in text.stdout and f"fixture failure for {uid}" in text.stdout
        again = node.cli("requeue", uid)
        assert again.returncode == 0 and f"queued {uid}" in again.stdout
        # A new job ran (and, this pipeline being what it is, failed again).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mine = [f for f in node.status()["failed"] if f["study_instance_uid"] == uid]
            if len(mine) == 2:
                break
            time.sleep(0.3)
        assert len(mine) == 2 and all(f["attempts"] == 2 for f in mine)
        assert node.cli("requeue", "--failed").returncode == 0
        assert node.cli("requeue", "1.2.3.4.5.6.7.8.9.404").returncode == 1


def test_a_deterministic_failure_is_not_retried_and_shows_in_status(tmp_path: Path) -> None:
    with running_node(
        tmp_path / "node",
        worker={"pipeline": "fixture_pipelines:broken", "processes": 1},
        queue={"max_attempts": 3, "retry_backoff_s": 0.2},
    ) as node:
        uid = generate_uid()
        [run] = storescu([make_instance(tmp_path / "in", study_uid=uid)], node.port)
        assert run.returncode == 0
        node.wait_for(lambda s: s.get(uid, {}).get("state") == "failed", 60, "study failed")
        [failed] = [f for f in node.status()["failed"] if f["study_instance_uid"] == uid]
        assert failed["attempts"] == 1  # not 3: the same input fails the same way
        assert f"fixture bug for {uid}" in failed["reason"]
        reason = node.studies()[uid]["reason"]
        assert "not retried" in reason and f"fixture bug for {uid}" in reason
        text = node.cli("status").stdout
        assert "not retried" in text and f"fixture bug for {uid}" in text


def test_a_frozen_worker_loses_its_job_to_another(tmp_path: Path) -> None:
    with running_node(
        tmp_path / "node",
        worker={"pipeline": "fixture_pipelines:slow", "processes": 0},
        queue={"heartbeat_interval_s": 0.5, "stalled_after_s": 3},
        destinations=DESTINATIONS,
    ) as node:
        uid = generate_uid()
        [run] = storescu([make_instance(tmp_path / "in", study_uid=uid)], node.port)
        assert run.returncode == 0
        frozen = _start_worker(node.config, tmp_path / "frozen.log", delay="6")
        try:
            node.wait_for(
                lambda s: s.get(uid, {}).get("state") == "processing", 60, "claimed by worker A"
            )
            os.kill(frozen.pid, signal.SIGSTOP)
            rescuer = _start_worker(node.config, tmp_path / "rescuer.log", delay="0.1")
            try:
                node.wait_for(
                    lambda s: s.get(uid, {}).get("state") == "done", 60, "done by worker B"
                )
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
                time.sleep(7)  # let A finish its sleep and try to hand in its results
                rescuer.send_signal(signal.SIGTERM)
                rescuer.wait(30)
        finally:
            frozen.send_signal(signal.SIGTERM)
            frozen.wait(30)
        db = _db(node)
        with db.read() as s:
            [job] = s.execute(select(Job.status, Job.worker, Job.attempts)).all()
            assert s.scalar(select(func.count()).select_from(Delivery)) == 1
        assert job.status == JobStatus.DONE and job.attempts == 1
        assert job.worker.split(":")[1] == str(rescuer.pid)
        assert "results are discarded" in (tmp_path / "frozen.log").read_text()
        assert "reclaimed job" in (tmp_path / "rescuer.log").read_text()
