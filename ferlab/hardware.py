"""What machine this is, for benchmark printouts and model cards."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
    """E.g. 'Intel(R) Xeon(R) ..., 2 cores'."""
    return f"{cpu_name()}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is no /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def busy_cores(interval: float = 0.5) -> float:
    """How many cores other work keeps busy now: CPU use sampled over ``interval`` seconds.

    Sampled (from /proc/stat) rather than the 1-minute load average, which still counts work that has just
    ended, e.g. this process's previous training run. Falls back to the load average where /proc/stat is absent.
    """
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0]
    time.sleep(interval)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (after[0] - before[0]) / (after[1] - before[1])
