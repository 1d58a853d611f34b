"""ferlab.hardware: the free-core sampling behind ``threads = 0``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ferlab import hardware
from ferlab.train import fit


@pytest.mark.skipif(hardware._cpu_times() is None, reason="needs Linux /proc/stat")
def test_busy_cores_sees_a_spinning_process():
    before = hardware.busy_cores(0.5)
    if before > len(os.sched_getaffinity(0)) - 1:
        pytest.skip(f"{before:.1f} cores are busy already: one more spinning process cannot be told apart")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        hardware.busy_cores(0.3)  # let the spinner start
        assert hardware.busy_cores(0.5) - before >= 0.6
    finally:
        spin.kill()
        spin.wait()


def test_auto_threads_follows_the_sampled_cores_not_the_load_average(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(fit.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(fit.os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # a run that has just ended
    monkeypatch.setattr(hardware, "busy_cores", lambda interval=0.5: 1.2)
    assert fit.auto_threads() == 3
    monkeypatch.setattr(hardware, "busy_cores", lambda interval=0.5: 9.0)
    assert fit.auto_threads() == 1
    assert fit.auto_threads(world_size=2) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert fit.auto_threads() == 0


def test_busy_cores_counts_only_the_cpus_this_process_may_use(monkeypatch):
    # a 4-CPU host; this process is pinned to CPUs 1 and 2. Between the samples CPU 0 and CPU 3 (not ours) are
    # fully busy, CPU 1 is half busy and CPU 2 idle: 0.5 busy cores of ours, not 2.5
    def stat(busy: list[int], idle: list[int]) -> str:
        total = f"cpu {sum(busy)} 0 0 {sum(idle)} 0 0 0 0 0 0"
        per_cpu = [f"cpu{i} {b} 0 0 {d} 0 0 0 0 0 0" for i, (b, d) in enumerate(zip(busy, idle, strict=True))]
        return "\n".join([total, *per_cpu])

    samples = iter([stat([0, 0, 0, 0], [0, 0, 0, 0]), stat([100, 50, 0, 100], [0, 50, 100, 0])])
    monkeypatch.setattr(hardware, "_cpu_times", lambda real=hardware._cpu_times: real(next(samples)))
    monkeypatch.setattr(hardware, "_usable_cpus", lambda: {1, 2})
    monkeypatch.setattr(hardware.time, "sleep", lambda s: None)
    assert hardware.busy_cores() == pytest.approx(0.5)
