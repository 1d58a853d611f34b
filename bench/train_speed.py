"""Training throughput: plain fp32 against ferlab's fast path, per model, and thread settings, in one run.

Each measurement runs in a fresh subprocess (jemalloc and OpenMP settings must be in place before Python
starts) and times real ``train_one_epoch`` steps (standard augmentation) on random uint8 images.

Modes (all with the same number of threads, all cores by default):
  fp32            plain PyTorch fp32, contiguous (NCHW) tensors, glibc malloc
  fast            channels_last + bfloat16 autocast, glibc malloc (`FERLAB_JEMALLOC=0 ferlab train ...`)
  fast+jemalloc-defaults  the same with jemalloc preloaded, jemalloc's default settings
  fast+jemalloc   jemalloc without page decay or background thread: what the `ferlab` launcher does
  fp32-cl+jemalloc  (with --fp32-cl) fp32, channels_last, the launcher's jemalloc: `ferlab train --precision fp32`
Printed per model: images/s, achieved GFLOP/s (3 x the forward FLOPs of one image, for forward + backward,
times images/s) and the ratio fast+jemalloc / fp32 (the fast path as `ferlab train` runs it). Where jemalloc is not
installed the jemalloc modes are skipped (the launcher then runs with glibc's allocator: the ratio is fast / fp32,
and the fp32-cl mode has no jemalloc).

``ferlab train`` runs in the precision ``auto`` resolves to on this CPU (bf16 where it has AVX512-BF16 or AMX
instructions, else fp32): the first line says which, and the ratio column compares that default with plain fp32.

Threads (the default mode, first model): 1 thread, all threads, all threads with OMP_WAIT_POLICY=PASSIVE, and all
threads watched by ferlab's thread governor (``threads = 0``: re-checked every few seconds, one thread per core
that other processes leave free), each on the machine as it is and with ``--contention K`` busy processes
started by the bench. OpenMP threads spin while waiting by default; when another process holds a core, a
spinning thread burns the time slice its partner needs, which is where multi-thread training under contention
loses most of its speed.

    python bench/train_speed.py                      # 4 models x 4 modes, then the thread table
    python bench/train_speed.py --quick              # fewer, smaller steps (a rough look)
    python bench/train_speed.py --models r002-vgg --steps 30 --no-threads
    python bench/train_speed.py --models fer-resnet-s --no-threads --sides 48 40 32   # progressive resizing

``--sides`` adds a table for the first model in the launcher's mode: images/s when training on augmented images
resized to each side (``--size-start`` of ``ferlab train``), and the speed-up over 48 x 48.

``--study-calibration FILE`` measures what ``ferlab study`` estimates its training time from (one epoch of each
of its recipes, trained by ``ferlab train`` on one thread, validation included; the forward MFLOP/s of one core;
the 2-thread speed-up) and writes it as JSON: ``python bench/train_speed.py --study-calibration
ferlab/study/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

from ferlab.cli import JEMALLOC, JEMALLOC_CONF  # what the launcher preloads, and how
from ferlab.hardware import cpu_name, resolve_precision

DEFAULT_MODELS = ["r002-vgg", "fer-resnet-s", "fer-mobile", "r004-cnn9"]
STUDY_CNNS = ["fer-resnet-s", "r002-vgg"]  # the study's one-core MFLOP/s and 2-thread speed-up come from these


@dataclass(frozen=True)
class Mode:
    precision: str
    channels_last: bool
    jemalloc: bool
    malloc_conf: str = ""


MODES: dict[str, Mode] = {
    "fp32": Mode("fp32", False, False),
    "fast": Mode("bf16", True, False),
    "fast+jemalloc-defaults": Mode("bf16", True, True),
    "fast+jemalloc": Mode("bf16", True, True, JEMALLOC_CONF),
}
# what `ferlab train --precision fp32` runs (channels_last, the launcher's jemalloc, no autocast): the default
# where the CPU has no bf16 instructions
FP32_CL_MODE = "fp32-cl+jemalloc"
FP32_CL_GLIBC_MODE = "fp32-cl"  # the same without jemalloc installed
EXTRA_MODES: dict[str, Mode] = {FP32_CL_MODE: Mode("fp32", True, True, JEMALLOC_CONF),
                                FP32_CL_GLIBC_MODE: Mode("fp32", True, False)}
ALL_MODES = {**MODES, **EXTRA_MODES}


def default_mode(jemalloc: bool = True) -> str:
    """What ``ferlab train`` runs on this CPU (precision auto; the launcher preloads jemalloc only where it is
    installed): the ratio and the thread table use it."""
    bf16 = resolve_precision("auto")[0] == "bf16"
    if jemalloc:
        return "fast+jemalloc" if bf16 else FP32_CL_MODE
    return "fast" if bf16 else FP32_CL_GLIBC_MODE


@dataclass(frozen=True)
class ThreadSetting:
    threads: int  # 0 = all cores
    env: dict[str, str] = field(default_factory=dict)
    governed: bool = False  # ferlab's ThreadGovernor adjusts the count during the run (``ferlab train``'s default)


GOVERNOR_PERIOD_S = 2.0  # the bench's runs are short: the governor re-checks every 2 s (ferlab train: 10 s)


def thread_settings(cores: int) -> dict[str, ThreadSetting]:
    return {
        "1 thread": ThreadSetting(1),
        f"{cores} threads": ThreadSetting(cores),
        f"{cores} threads, OMP_WAIT_POLICY=PASSIVE": ThreadSetting(cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
        f"{cores} threads, governed (ferlab train)": ThreadSetting(cores, governed=True),
    }


def measure(model_name: str, mode: Mode, threads: int, batch: int, steps: int, warmup: int, side: int = 48,
            governed: bool = False) -> dict:
    """Time ``steps`` training steps (after ``warmup``) with the real train_one_epoch on random data, trained
    at ``side`` x ``side`` (the 48 x 48 images resized after augmentation, as progressive resizing does);
    ``governed``: with ferlab's thread governor checking the free cores after every step."""
    import time

    import torch

    from ferlab.hardware import ThreadGovernor
    from ferlab.models import create_model
    from ferlab.models.summary import flops_per_image
    from ferlab.train.engine import train_one_epoch
    from ferlab.transforms import AUGMENT_PRESETS, Normalizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name)
    flops = flops_per_image(model)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    n = batch * (steps + warmup)
    x = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8)
    y = torch.randint(0, 7, (n,))
    governor = ThreadGovernor(max_threads=threads, period=GOVERNOR_PERIOD_S) if governed else None
    kw = dict(batch_size=batch, aug=AUGMENT_PRESETS["standard"], normalizer=Normalizer("unit"),
              precision=mode.precision, channels_last=mode.channels_last, progress=False,
              size=side, on_step=governor.step if governor else None)
    train_one_epoch(model, opt, x[: batch * warmup], y[: batch * warmup], g=torch.Generator().manual_seed(0), **kw)
    t0 = time.perf_counter()
    train_one_epoch(model, opt, x[batch * warmup :], y[batch * warmup :], g=torch.Generator().manual_seed(1), **kw)
    dt = time.perf_counter() - t0
    ips = batch * steps / dt
    return {"images_per_s": ips, "gflops_per_s": ips * 3 * flops / 1e9, "mflops_per_image": flops / 1e6,
            "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, model: str, mode: str, setting: ThreadSetting, side: int = 48) -> dict:
    """One measurement in a fresh interpreter with the mode's allocator and the setting's environment."""
    drop = ("LD_PRELOAD", "MALLOC_CONF", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(setting.env, OMP_NUM_THREADS=str(setting.threads))
    if ALL_MODES[mode].jemalloc:
        env["LD_PRELOAD"] = JEMALLOC
    if ALL_MODES[mode].malloc_conf:
        env["MALLOC_CONF"] = ALL_MODES[mode].malloc_conf
    cmd = [sys.executable, __file__, "--_child", f"{model}|{mode}|{setting.threads}|{side}|{int(setting.governed)}",
           "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {model} {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def busy_processes(k: int):
    """``k`` processes spinning on the CPU for the duration (each stopped by its own pid afterwards)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads for the mode table (0: all cores)")
    ap.add_argument("--quick", action="store_true", help="batch 64, 4 steps after 1 warm-up (rough numbers)")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-setting table")
    ap.add_argument("--contention", type=int, default=1, help="busy processes for the contended column")
    ap.add_argument("--sides", type=int, nargs="*", default=[],
                    help="also time the first model trained at these image sides, e.g. 48 40 32")
    ap.add_argument("--fp32-cl", action="store_true",
                    help="also time fp32 with channels_last and jemalloc (`ferlab train --precision fp32`): on a CPU "
                         "without AMX it can beat bf16 autocast for nets of depthwise convolutions")
    ap.add_argument("--json", action="store_true", help="also print all measurements as JSON")
    ap.add_argument("--study-calibration", metavar="FILE",
                    help="measure what `ferlab study` estimates its time from and write it to FILE (JSON)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup = 64, 4, 1
    if args._child:
        name, mode, threads, side, governed = args._child.split("|")
        print(json.dumps(measure(name, ALL_MODES[mode], int(threads), args.batch, args.steps, args.warmup,
                                 int(side), governed=bool(int(governed)))))
        return
    jemalloc = os.path.exists(JEMALLOC)
    if not jemalloc:
        print(f"{JEMALLOC} not found (apt-get install libjemalloc2): the jemalloc modes are skipped; `ferlab train` "
              "runs with glibc's allocator here", file=sys.stderr)
    default = default_mode(jemalloc)
    if args.study_calibration:
        study_calibration(args, default)
        return
    fp32_cl = FP32_CL_MODE if jemalloc else FP32_CL_GLIBC_MODE
    modes = [m for m in MODES if jemalloc or not MODES[m].jemalloc] + (
        [fp32_cl] if args.fp32_cl or default == fp32_cl else [])

    cores = os.cpu_count() or 1
    threads = args.threads or cores
    load = os.getloadavg()[0]
    precision, why = resolve_precision("auto")
    print(f"{cpu_name()}; batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up; {threads} threads; "
          f"{cores} cores; load average {load:.2f} at start (an idle machine reads ~0)")
    print(f"ferlab train's default here: precision {precision} ({why}), i.e. mode {default}")
    results: dict = {"cpu": cpu_name(), "batch": args.batch, "steps": args.steps, "threads": threads,
                     "load_at_start": load, "default_precision": precision, "default_precision_why": why,
                     "default_mode": default, "jemalloc": jemalloc, "models": [], "thread_settings": [], "sides": []}
    head = f"{'model':<14} {'MFLOPs/img':>10}" + "".join(f"  {m + ' img/s':>27} {'GFLOP/s':>7}" for m in modes)
    print(head + f"  {default + ' / fp32':>11}")
    for name in args.models:
        row = {"model": name}
        for mode in modes:
            row[mode] = run_child(args, name, mode, ThreadSetting(threads))
        row["ratio"] = row[default]["images_per_s"] / row["fp32"]["images_per_s"]
        results["models"].append(row)
        cells = "".join(f"  {row[m]['images_per_s']:27.0f} {row[m]['gflops_per_s']:7.1f}" for m in modes)
        print(f"{name:<14} {row['fp32']['mflops_per_image']:10.1f}{cells}  {row['ratio']:10.2f}x", flush=True)

    if args.sides:
        model = args.models[0]
        print(f"\nprogressive resizing: {model}, {default}, trained at each side")
        print(f"{'side':>6} {'img/s':>8} {'vs 48x48':>9}")
        base = None
        for side in sorted(set(args.sides), reverse=True):  # 48 first: the base of the ratio
            ips = run_child(args, model, default, ThreadSetting(threads), side)["images_per_s"]
            base = ips if side == 48 else base
            results["sides"].append({"side": side, "images_per_s": ips})
            print(f"{side:>6} {ips:8.0f} {f'{ips / base:.2f}x' if base else '':>9}", flush=True)

    if not args.no_threads:
        model = args.models[0]
        print(f"\nthreads: {model}, {default}, images/s; 'contended': +{args.contention} busy process(es)")
        print(f"{'setting':<40} {'as is':>8} {'contended':>10}")
        for label, setting in thread_settings(cores).items():
            as_is = run_child(args, model, default, setting)["images_per_s"]
            with busy_processes(args.contention):
                contended = run_child(args, model, default, setting)["images_per_s"]
            results["thread_settings"].append({"setting": label, "as_is": as_is, "contended": contended})
            print(f"{label:<40} {as_is:8.0f} {contended:10.0f}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


CALIBRATION_SIZES = {"n_train": 4096, "n_val": 512, "n_test": 64}  # synthetic faces: one epoch of each recipe


def time_recipe(cfg, threads: int) -> float:
    """Seconds of one epoch (training and validation, as the run records them) of recipe ``cfg`` on
    CALIBRATION_SIZES synthetic faces, trained by `ferlab train` in its own process (the launcher's allocator)."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from ferlab.cli import launcher_env

    cfg = dataclasses.replace(cfg, data=None, synthetic=CALIBRATION_SIZES, epochs=1, threads=threads,
                              early_stopping=0, size_start=0, size_ramp_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(cfg.to_dict()))
        cmd = [sys.executable, "-m", "ferlab", "train", "--config", str(config), "--out", f"{tmp}/run",
               "--no-progress"]
        out = subprocess.run(cmd, env=launcher_env(os.environ) or dict(os.environ), capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"training {cfg.model} failed:\n{out.stderr[-2000:]}")
        return float(json.loads((Path(tmp) / "run" / "summary.json").read_text())["train_seconds_total"])


def study_calibration(args: argparse.Namespace, mode: str) -> None:
    """Write the study's time-estimate calibration (see the module docstring) to ``args.study_calibration``: one
    epoch of each recipe of the FER2013 budgets (full, long), timed end to end (validation included), as images/s in
    the terms of ``ferlab.study.plan.estimate_seconds``: (train + val / 3) images per epoch second."""
    from ferlab.study.plan import BUDGETS, model_key, plan_for

    recipes = {}
    for budget in BUDGETS.values():
        if budget.needs_data:
            for e in plan_for(budget, "fer2013.csv.gz"):
                recipes.setdefault(model_key(e.cfg.model, e.cfg.model_args), e.cfg)
    per_epoch = CALIBRATION_SIZES["n_train"] + CALIBRATION_SIZES["n_val"] / 3
    one = {}
    for key, cfg in recipes.items():
        one[key] = per_epoch / time_recipe(cfg, 1)
        print(f"{key:<28} 1 thread  {one[key]:8.1f} img/s", flush=True)
    cnns = [k for k in STUDY_CNNS if k in recipes]
    two = {}
    for key in cnns:
        two[key] = per_epoch / time_recipe(recipes[key], 2)
        print(f"{key:<28} 2 threads {two[key]:8.1f} img/s", flush=True)
    core = sum(one[k] * _mflops(recipes[k]) for k in cnns) / len(cnns)
    out = {
        "cpu": cpu_name(), "precision": resolve_precision("auto")[0],
        "what": "one epoch of each recipe of `ferlab study --budget full` and `--budget long` on synthetic faces "
                f"({CALIBRATION_SIZES['n_train']} train, {CALIBRATION_SIZES['n_val']} val), validation included",
        "command": f"python bench/train_speed.py --study-calibration {args.study_calibration}",
        "images_per_s": {k: round(v, 1) for k, v in one.items()},
        "core_mflops_per_s": round(core, -2),
        "two_core_speedup": round(sum(two[k] / one[k] for k in cnns) / len(cnns), 2),
        "max_images_per_s": 2000.0,
    }
    with open(args.study_calibration, "w") as f:
        f.write(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _mflops(cfg) -> float:
    from ferlab.models import create_model
    from ferlab.models.summary import flops_per_image

    return flops_per_image(create_model(cfg.model, **cfg.model_args)) / 1e6


if __name__ == "__main__":
    main()
