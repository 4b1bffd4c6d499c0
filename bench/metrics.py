"""What the Prometheus metrics cost: per counted C-STORE, and per scrape.

Runs :mod:`dicomnode.metrics` in multiprocess mode (as under ``serve``) in a temporary
directory: the time of one ``instance_received`` call (a counter and a histogram, what
the receiver adds to each C-STORE), and the time to render ``/metrics`` (adding up the
files that ``processes`` processes left) without the database gauges.

    python3 bench/metrics.py [--calls 200000] [--processes 1 4 16]

Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def _count(folder: str, calls: int) -> None:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from dicomnode import metrics

    for _ in range(calls):
        metrics.instance_received(0, 0.01)


def _per_call_us(folder: str, calls: int) -> float:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from dicomnode import metrics

    metrics.instance_received(0, 0.01)  # made once, as at the receiver's start
    started = time.perf_counter()
    for _ in range(calls):
        metrics.instance_received(0, 0.01)
    return (time.perf_counter() - started) / calls * 1e6


def _scrape_ms(folder: str, repeat: int = 20) -> float:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        generate_latest(registry)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for n in args.processes:
        with tempfile.TemporaryDirectory() as folder:
            with ctx.Pool(1) as pool:
                per_call = pool.apply(_per_call_us, (folder, args.calls))
            procs = [ctx.Process(target=_count, args=(folder, 1000)) for _ in range(n - 1)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            with ctx.Pool(1) as pool:
                scrape = pool.apply(_scrape_ms, (folder,))
        rows.append((n, per_call, scrape))
    lines = [
        "",
        "## metrics",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: nproc {os.cpu_count()}, {platform.processor() or platform.machine()}",
        f"- command: `python3 bench/metrics.py --calls {args.calls}`",
        "- one counted C-STORE = `metrics.instance_received` (a labelled counter and a "
        "histogram, multiprocess mode); a scrape = MultiProcessCollector + text "
        "rendering, without the database gauges; median of 20 scrapes",
        "",
        "| processes that counted | per counted C-STORE | one scrape |",
        "|---|---|---|",
        *(f"| {n} | {us:.1f} µs | {ms:.1f} ms |" for n, us, ms in rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
