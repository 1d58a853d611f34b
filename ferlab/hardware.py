"""What machine this is: its CPU, whether it computes bfloat16 natively, and how many of its cores are free.

Used for the precision chosen by ``precision = "auto"``, the thread count chosen by ``threads = 0`` (and kept
right during long runs by :class:`ThreadGovernor`), and benchmark printouts.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

MAX_THREADS = 1024  # more threads is a typing slip (and crashes the thread pools), not a machine


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# /proc/cpuinfo flags of instructions that compute bfloat16 natively (AVX512-BF16: Cooper Lake, Sapphire Rapids,
# Zen 4 and later; AMX-BF16: Sapphire Rapids and later). Elsewhere oneDNN either emulates bf16 (AVX-512 without
# BF16) or refuses it (AVX2), and bf16 autocast ran 10-12x slower than fp32 on an AVX2-only EPYC (train_speed).
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which those instructions stay in use; any other cap disables them
BF16_ISA_CAPS: tuple[str, ...] = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                                  "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                                  "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_native(flags: set[str] | None = None, environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bfloat16 in hardware, why): its bf16 instructions, unless a oneDNN ISA cap
    (``ONEDNN_MAX_CPU_ISA``, e.g. ``AVX2`` to try a machine without them) keeps them out of use."""
    flags = cpu_flags() if flags is None else flags
    environ = dict(os.environ) if environ is None else environ
    have = [f for f in BF16_FLAGS if f in flags]
    if not have:
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return False, f"this CPU has no bf16 instructions ({isa})"
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap and cap not in BF16_ISA_CAPS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps this CPU's bf16 instructions out of use"
    return True, f"this CPU has {' and '.join(f.upper().replace('_', '-') for f in have)} instructions"


def resolve_precision(requested: str, device: str = "cpu") -> tuple[str, str]:
    """(``bf16`` or ``fp32``, why) for a requested precision: ``auto`` is bf16 autocast where the device computes
    bf16 natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX) and fp32 elsewhere; bf16 and fp32 are kept."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested, "as requested"
    if str(device).startswith("cuda"):
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ("bf16", "auto: the GPU computes bf16") if ok else ("fp32", "auto: the GPU has no bf16")
    native, why = bf16_native()
    return ("bf16" if native else "fp32"), f"auto: {why}"


def slow_bf16_warning(precision: str, device: str = "cpu") -> str | None:
    """A warning when bf16 is asked for on a CPU that would emulate it (about 10x slower than fp32); else None."""
    if precision != "bf16" or str(device).startswith("cuda"):
        return None
    native, why = bf16_native()
    return None if native else f"precision bf16 requested but {why}: it runs emulated, several times slower than " \
                               "fp32 (use --precision auto or fp32)"


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
    return _busy_between(before, after)


def _busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """Busy cores, of those this process may use, between two :func:`_cpu_times` samples."""
    cpus = _usable_cpus() or set(before)
    busy = 0.0
    for cpu in cpus & set(before) & set(after):
        d_busy, d_total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        busy += d_busy / d_total if d_total > 0 else 0.0
    return busy


def free_cores(busy: float, cores: int | None = None) -> int:
    """Threads for ``busy`` cores held by other work: one per free core, at least one."""
    cores = cores or len(_usable_cpus() or range(os.cpu_count() or 1))
    return max(1, min(cores, cores - round(busy)))


class ThreadGovernor:
    """Keeps torch's thread count at the cores that other processes leave free, during a long run.

    OpenMP threads wait for each other at every parallel step, so a two-thread run on two cores slows 10-20x
    when another process takes one core; with one thread it slows about 2x. Call :meth:`step` often (after each
    batch): every ``period`` seconds it measures, without pausing, how much of the cores other processes used
    (the cores' busy time minus this process's own CPU time) and sets the thread count to the free cores, up to
    ``max_threads``. A change is made only after two periods agree, so a short burst does not flip it.
    ``log`` receives a line per change.
    """

    def __init__(self, max_threads: int | None = None, period: float = 10.0,
                 log: Callable[[str], None] | None = None, apply: Callable[[int], None] | None = None) -> None:
        import torch

        self.max_threads = max_threads or len(_usable_cpus() or range(os.cpu_count() or 1))
        self.period, self.log = period, log
        self.apply = apply or torch.set_num_threads  # sets the thread count (also OpenCV's, for prediction)
        self.threads = torch.get_num_threads()
        self._pending: int | None = None
        self._mark: tuple[float, dict[int, tuple[int, int]], float] | None = None
        self.start()

    def start(self) -> None:
        """Begin a new measuring window (e.g. after a pause in which this process did other work)."""
        times = _cpu_times()
        self._mark = (time.monotonic(), times, time.process_time()) if times is not None else None

    def others_busy(self) -> float | None:
        """Cores used by other processes since the window began; None before ``period`` seconds or without
        /proc/stat."""
        if self._mark is None:
            return None
        t0, before, own0 = self._mark
        elapsed = time.monotonic() - t0
        if elapsed < self.period:
            return None
        after, own1 = _cpu_times(), time.process_time()
        if after is None:
            return None
        self._mark = (time.monotonic(), after, own1)
        return max(0.0, _busy_between(before, after) - (own1 - own0) / elapsed)

    def step(self) -> int | None:
        """Re-check when a window has ended; returns the new thread count when it changed, else None."""
        others = self.others_busy()
        if others is None:
            return None
        want = free_cores(others, self.max_threads)
        if want == self.threads:
            self._pending = None
            return None
        if self._pending != want:  # the first window that disagrees: wait for a second
            self._pending = want
            return None
        self.apply(want)
        old, self.threads, self._pending = self.threads, want, None
        if self.log is not None:
            self.log(f"torch threads: {old} -> {want} (other processes use {others:.1f} of "
                     f"{self.max_threads} cores)")
        return want
