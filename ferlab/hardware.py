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


def _usable_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity set), or None where the OS does not say."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _cpu_times(stat: str | None = None) -> dict[int, tuple[int, int]] | None:
    """(busy, total) jiffies of each CPU (``cpuN`` lines of /proc/stat), or None where there is no /proc/stat."""
    try:
        text = Path("/proc/stat").read_text() if stat is None else stat
        times = {}
        for line in text.splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                fields = [int(v) for v in values]
                idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
                total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
                times[int(name[3:])] = (total - idle, total)
    except (OSError, ValueError, IndexError):
        return None
    return times or None


def busy_cores(interval: float = 0.5) -> float:
    """How many of the cores this process may use other work keeps busy now: CPU use sampled over ``interval``
    seconds on the CPUs of this process's affinity set (in a container pinned to 2 of a host's 64 CPUs, those 2).

    Sampled (from /proc/stat) rather than the 1-minute load average, which still counts work that has just
    ended, e.g. this process's previous training run. Falls back to the load average where /proc/stat is absent.
    """
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0]
    time.sleep(interval)
    after = _cpu_times()
    if after is None:
        return os.getloadavg()[0]
    cpus = _usable_cpus() or set(before)
    busy = 0.0
    for cpu in cpus & set(before) & set(after):
        d_busy, d_total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        busy += d_busy / d_total if d_total > 0 else 0.0
    return busy
