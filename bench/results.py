"""Shared by the benchmarks: the machine's description and ``RESULTS.md`` sections."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")


def machine_description() -> str:
    """nproc, CPU model, memory and kernel."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return f"nproc {os.cpu_count()}, {model}{mem}, Linux {platform.release()}"


def write_section(path: Path, heading: str, section: list[str]) -> None:
    """Replace (or append) the section that starts with ``heading``, keeping the others."""
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = existing.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        new = [*lines, "", *section]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        new = [*lines[:start], *section, *([""] if tail else []), *tail]
    path.write_text("\n".join(new).rstrip("\n") + "\n")
