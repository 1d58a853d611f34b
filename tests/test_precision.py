"""The precision chosen by the hardware (``auto``) and the thread governor under contention."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from ferlab import hardware
from ferlab.train.config import TrainConfig, resolve_config

XEON_AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
ZEN3 = {"avx2", "fma"}  # the AVX2-only EPYC: no bf16 instructions
SKYLAKE_X = {"avx2", "avx512f"}  # AVX-512 without BF16: oneDNN emulates bf16


@pytest.mark.parametrize(("flags", "native"), [(XEON_AMX, True), (ZEN4, True), (ZEN3, False), (SKYLAKE_X, False),
                                               (set(), False)])
def test_bf16_native_from_the_cpu_flags(flags, native):
    got, why = hardware.bf16_native(flags, environ={})
    assert got is native
    assert ("AVX512-BF16" in why) is ("avx512_bf16" in flags) and ("AMX-BF16" in why) is ("amx_bf16" in flags)
    if not native:
        assert "no bf16 instructions" in why


def test_a_onednn_isa_cap_turns_bf16_off():
    assert hardware.bf16_native(XEON_AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == (
        False, "ONEDNN_MAX_CPU_ISA=AVX2 keeps this CPU's bf16 instructions out of use")
    assert hardware.bf16_native(XEON_AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"})[0]


def test_cpu_flags_parses_proc_cpuinfo():
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert hardware.cpu_flags(text) == {"fpu", "avx2", "avx512_bf16"}
    assert hardware.cpu_flags("no flags here") == set()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(hardware, "bf16_native", lambda *a, **k: (native, "because"))
    assert hardware.resolve_precision("auto") == ("bf16" if native else "fp32", "auto: because")
    assert hardware.resolve_precision("fp32") == ("fp32", "as requested")
    cfg, line = resolve_config(TrainConfig())
    assert TrainConfig().precision == "auto" and cfg.precision == ("bf16" if native else "fp32")
    assert line.startswith(f"precision {cfg.precision} (auto: because)")
    # bf16 asked for explicitly where it would be emulated: kept, with a warning in the line
    cfg, line = resolve_config(TrainConfig(precision="bf16"))
    assert cfg.precision == "bf16" and ("warning" in line) is (not native)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_checkpoint_precision_falls_back_to_fp32_without_bf16(monkeypatch):
    from ferlab.evaluate import checkpoint_precision

    bf16_meta = {"train": {"precision": "bf16"}}
    monkeypatch.setattr(hardware, "bf16_native", lambda *a, **k: (False, "no"))
    assert checkpoint_precision(bf16_meta) == "fp32" and checkpoint_precision(bf16_meta, "bf16") == "bf16"
    monkeypatch.setattr(hardware, "bf16_native", lambda *a, **k: (True, "yes"))
    assert checkpoint_precision(bf16_meta) == "bf16"
    assert checkpoint_precision({"train": {"precision": "fp32"}}) == "fp32"


def test_a_run_saves_the_precision_it_resolved_and_says_so_first(tmp_path):
    from ferlab.train.fit import fit

    lines: list[str] = []
    fit(tiny_config(precision="auto", epochs=1, threads=1), tmp_path / "run", progress=False, log=lines.append)
    want, why = hardware.resolve_precision("auto")
    assert lines[0].startswith(hardware.describe()) and f"precision {want} ({why})" in lines[0]
    saved = json.loads((tmp_path / "run/config.json").read_text())["train"]["precision"]
    assert saved == want  # resumes, evaluations and the study's run hashes see the concrete precision


def test_demo_and_evaluate_take_precision():
    from ferlab.cli import build_parser

    p = build_parser()
    assert p.parse_args(["demo"]).precision == "auto"
    assert p.parse_args(["demo", "--precision", "fp32"]).precision == "fp32"
    assert p.parse_args(["evaluate", "x", "--precision", "bf16"]).precision == "bf16"
    assert p.parse_args(["predict-csv", "x", "--data", "d"]).precision == "auto"
    assert p.parse_args(["predict", "x.jpg", "--precision", "auto"]).precision == "auto"
    assert p.parse_args(["serve", "--precision", "fp32"]).precision == "fp32"


# ----------------------------------------------------------------------------- the thread governor
class FakeClock:
    """Scripted /proc/stat samples and CPU times for ThreadGovernor: each window, ``others`` cores of the two are
    busy with other processes and this process used ``own`` cores."""

    def __init__(self, monkeypatch) -> None:
        self.t, self.busy, self.own = 0.0, [0, 0], 0.0
        monkeypatch.setattr(hardware, "_cpu_times", lambda: {i: (self.busy[i], int(self.t * 100))
                                                             for i in range(2)})
        monkeypatch.setattr(hardware, "_usable_cpus", lambda: {0, 1})
        monkeypatch.setattr(hardware.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(hardware.time, "process_time", lambda: self.own)

    def window(self, seconds: float, others: float, own: float) -> None:
        total = others + own  # busy cores in all, shared out over the two CPUs
        for i in range(2):
            self.busy[i] += int(seconds * 100 * min(1.0, max(0.0, total - i)))
        self.own += own * seconds
        self.t += seconds


def test_governor_follows_other_processes_after_two_windows(monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        clock = FakeClock(monkeypatch)
        lines: list[str] = []
        gov = hardware.ThreadGovernor(max_threads=2, period=10, log=lines.append)
        clock.window(5, others=1.0, own=1.0)
        assert gov.step() is None  # the window is not over yet
        clock.window(5, others=1.0, own=1.0)
        assert gov.step() is None and gov.threads == 2  # one window disagrees: wait for a second
        clock.window(10, others=1.0, own=1.0)
        assert gov.step() == 1 and torch.get_num_threads() == 1
        assert lines == ["torch threads: 2 -> 1 (other processes use 1.0 of 2 cores)"]
        clock.window(10, others=0.0, own=1.0)  # the other process ended
        assert gov.step() is None
        clock.window(10, others=0.0, own=1.0)
        assert gov.step() == 2 and torch.get_num_threads() == 2
        clock.window(10, others=1.0, own=1.0)  # a burst of one window only: nothing changes
        gov.step()
        clock.window(10, others=0.0, own=2.0)
        assert gov.step() is None and gov.threads == 2
    finally:
        torch.set_num_threads(threads)


def test_free_cores():
    assert [hardware.free_cores(b, 2) for b in (0.0, 0.4, 0.6, 1.0, 1.7, 5.0)] == [2, 2, 1, 1, 1, 1]


def test_a_study_run_hash_sees_auto_as_the_precision_it_resolves_to():
    from ferlab.study.plan import Experiment
    from ferlab.study.runner import run_hash

    resolved = hardware.resolve_precision("auto")[0]
    auto = Experiment("x", "q1", TrainConfig(model="r000-cnn1"))

    def with_precision(p: str) -> str:
        return run_hash(Experiment("x", "q1", TrainConfig(model="r000-cnn1", precision=p)), "fp")

    assert run_hash(auto, "fp") == with_precision(resolved)
    assert run_hash(auto, "fp") != with_precision("fp32" if resolved == "bf16" else "bf16")


def test_fit_gives_the_callers_thread_count_back(tmp_path):
    import torch

    from ferlab.train.fit import fit

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        fit(tiny_config(epochs=1, threads=1), tmp_path / "run", progress=False, log=lambda _: None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
