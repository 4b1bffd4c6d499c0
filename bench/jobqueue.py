#!/usr/bin/env python3
"""Job queue benchmark: claim throughput and completion-to-claim wait.

Usage::

    python3 bench/jobqueue.py            # 400 jobs per cell
    python3 bench/jobqueue.py --quick    # 100 jobs per cell

For SQLite and for a PostgreSQL server started here (``initdb`` + ``pg_ctl`` on a
free loopback port), with 1 and 4 workers:

* **claim throughput**: N studies are queued at once; worker processes claim and
  finish them with an empty pipeline (timed from a common start signal, after
  every process has imported and connected). Reported: jobs/s, and the median and p95 duration
  of one ``claim()`` call (the per-job overhead of the queue).
* **completion-to-claim wait**: studies arrive one by one (every 20 ms) with a
  0.2 s quiet period; the node's own completion scheduler (APScheduler, default
  ``completion.check_interval_s``) queues them and the workers' poll loop
  (default ``queue.poll_interval_s``; worker threads here) claims them. Reported: median and p95 of
  claim time minus the moment the quiet period ended (``study.quiet_until``).

Prints a table and writes it to ``bench/RESULTS.md`` under ``## queue``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from results import RESULTS, machine_description, write_section  # noqa: E402
from support import PostgresServer, index_study, pg_bin_dir  # noqa: E402

from dicomnode.completion import CompletionScheduler, complete_due_studies  # noqa: E402
from dicomnode.config import CompletionSettings, QueueSettings  # noqa: E402
from dicomnode.db import Database, Job, Study, utcnow  # noqa: E402
from dicomnode.queue import claim, enqueue, finish  # noqa: E402

QUEUE = QueueSettings()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _workers(db: Database, count: int, stop: threading.Event, claims: list[float]) -> list:
    """Worker threads that claim and finish jobs (empty pipeline) until ``stop``."""
    lock = threading.Lock()

    def loop(name: str) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            job = claim(db, name)
            took = time.perf_counter() - started
            if job is None:
                stop.wait(QUEUE.poll_interval_s)
                continue
            with lock:
                claims.append(took)
            finish(db, job, name, [], [], {})

    threads = [
        threading.Thread(target=loop, args=(f"bench:{os.getpid()}:w{i}",)) for i in range(count)
    ]
    for t in threads:
        t.start()
    return threads


def _claim_process(url: str, name: str, ready: Any, go: Any, out: Any) -> None:
    """One worker process: claim and finish until the queue is empty; report durations."""
    db = Database(url)
    claim(db, "warm-up:0:none", now=utcnow() - dt.timedelta(days=365))  # connect, compile
    ready.set()
    go.wait()
    durations = []
    while True:
        started = time.perf_counter()
        job = claim(db, name)
        took = time.perf_counter() - started
        if job is None:
            break
        durations.append(took)
        finish(db, job, name, [], [], {})
    out.put(durations)


def throughput(url: str, db: Database, jobs: int, workers: int) -> tuple[float, float, float]:
    """jobs/s and median / p95 claim duration (ms) for ``workers`` worker processes."""
    completion = CompletionSettings(quiet_period_s={"default": 0.0}, force_complete_s=60)
    now = utcnow()
    for _ in range(jobs):
        index_study(db, completion, now)
    complete_due_studies(db, on_complete=lambda s, study: enqueue(s, study, QUEUE, utcnow()))
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs, readies = [], []
    for i in range(workers):
        ready = ctx.Event()
        proc = ctx.Process(target=_claim_process, args=(url, f"bench:{i}:w", ready, go, out))
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        ready.wait(120)
    started = time.perf_counter()
    go.set()
    claims: list[float] = []
    for _ in procs:
        claims += out.get(timeout=600)
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join(60)
    assert len(claims) == jobs, f"{len(claims)} of {jobs} jobs claimed"
    ms = [c * 1000 for c in claims]
    return jobs / elapsed, statistics.median(ms), _percentile(ms, 0.95)


def latency(db: Database, studies: int, workers: int) -> tuple[float, float]:
    """Median and p95 seconds from the end of the quiet period to the claim."""
    completion = CompletionSettings(quiet_period_s={"default": 0.2}, force_complete_s=60)
    scheduler = CompletionScheduler(
        db,
        CompletionSettings().check_interval_s,
        on_complete=lambda s, study: enqueue(s, study, QUEUE, utcnow()),
    )
    scheduler.start()
    stop = threading.Event()
    claims: list[float] = []
    threads = _workers(db, workers, stop, claims)
    uids = []
    for _ in range(studies):
        uids.append(index_study(db, completion, utcnow()))
        time.sleep(0.02)
    deadline = time.monotonic() + 60
    while len(claims) < studies and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    scheduler.stop()
    with db.read() as session:
        rows = session.execute(
            select(Study.quiet_until, Job.started_at).join(Job, Job.study_id == Study.id)
        ).all()
    waits = [(started - quiet).total_seconds() for quiet, started in rows if started]
    return statistics.median(waits), _percentile(waits, 0.95)


@contextmanager
def backends(tmp: Path, quick: bool) -> Iterator[list[tuple[str, object]]]:
    """Database factories: a new SQLite file, or a new PostgreSQL database, per cell."""
    made: list[tuple[str, object]] = []
    counter = iter(range(1000))
    made.append(("SQLite", lambda: f"sqlite:///{tmp / f'q{next(counter)}.db'}"))
    server = None
    bin_dir = pg_bin_dir()
    if bin_dir is not None:
        root = tmp / "pg"
        tmp.chmod(0o755)
        server = PostgresServer(bin_dir, root)
        server.start()
        made.append(("PostgreSQL", server.create_database))
    else:
        print("PostgreSQL binaries not found: SQLite only")
    try:
        yield made
    finally:
        if server is not None:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 jobs per cell")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    jobs = 100 if args.quick else 400
    studies = 30 if args.quick else 100
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dicomnode-bench-queue-"))
    try:
        with backends(tmp, args.quick) as made:
            for name, new_url in made:
                for workers in (1, 4):
                    db = Database(new_url())  # type: ignore[operator]
                    db.migrate()
                    rate, claim_med, claim_p95 = throughput(db.url, db, jobs, workers)
                    db.dispose()
                    db = Database(new_url())  # type: ignore[operator]
                    db.migrate()
                    wait_med, wait_p95 = latency(db, studies, workers)
                    db.dispose()
                    row = (name, workers, rate, claim_med, claim_p95, wait_med, wait_p95)
                    print(
                        f"{name:<10} workers={workers}: {rate:7.1f} jobs/s, claim "
                        f"{claim_med:.2f} / {claim_p95:.2f} ms, completion-to-claim "
                        f"{wait_med:.2f} / {wait_p95:.2f} s"
                    )
                    rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = [
        "| database | workers | claim+finish throughput (jobs/s) | claim median (ms) | "
        "claim p95 (ms) | completion-to-claim median (s) | completion-to-claim p95 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, workers, rate, cm, cp, wm, wp in rows:
        table.append(
            f"| {name} | {workers} | {rate:.0f} | {cm:.2f} | {cp:.2f} | {wm:.2f} | {wp:.2f} |"
        )
    print("\n".join(table))
    if not args.no_write:
        section = "\n".join(
            [
                "## queue",
                "",
                f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine_description()}",
                f"- command: `python3 bench/jobqueue.py{' --quick' if args.quick else ''}`",
                f"- {jobs} jobs per throughput cell (worker processes claim and finish with an "
                "empty pipeline; latency cells use worker threads); "
                f"{studies} studies arriving every 20 ms with a 0.2 s quiet period per "
                "latency cell, completion check every "
                f"{CompletionSettings().check_interval_s} s, worker poll every "
                f"{QUEUE.poll_interval_s} s (the defaults)",
                "- targets: claim overhead under 5 ms per job; completion-to-claim under 1 s "
                "beyond the quiet period",
                "",
                *table,
                "",
            ]
        )
        write_section(RESULTS, "## queue", section.splitlines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
