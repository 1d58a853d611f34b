"""Training throughput: plain fp32 against ferlab's fast path, per model, measured in one run.

Each (model, mode) is timed in a fresh subprocess, because jemalloc must be preloaded
before Python starts. Modes:
  fp32            plain PyTorch fp32, contiguous (NCHW) tensors, glibc malloc
  fast            channels_last + bfloat16 autocast, glibc malloc
  fast+jemalloc   the same with jemalloc preloaded (what the `ferlab` launcher does)
Prints images/s, achieved GFLOP/s (3 x forward FLOPs per training image) and the speed-up over fp32.

    python bench/train_speed.py                      # default models
    python bench/train_speed.py --models r002-vgg --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MODES = {"fp32": ("fp32", False, False), "fast": ("bf16", True, False), "fast+jemalloc": ("bf16", True, True)}


def measure(model_name: str, precision: str, channels_last: bool, batch: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps (after ``warmup``) with the real train_one_epoch on random data."""
    import time

    import torch

    from ferlab.models import create_model
    from ferlab.models.summary import flops_per_image
    from ferlab.train.engine import train_one_epoch
    from ferlab.transforms import AUGMENT_PRESETS, Normalizer

    torch.manual_seed(0)
    model = create_model(model_name)
    flops = flops_per_image(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    n = batch * (steps + warmup)
    x = torch.randint(0, 256, (n, 1, 48, 48), dtype=torch.uint8)
    y = torch.randint(0, 7, (n,))
    kw = dict(batch_size=batch, aug=AUGMENT_PRESETS["standard"], normalizer=Normalizer("unit"),
              precision=precision, channels_last=channels_last, progress=False)
    train_one_epoch(model, opt, x[: batch * warmup], y[: batch * warmup], g=torch.Generator().manual_seed(0), **kw)
    t0 = time.perf_counter()
    train_one_epoch(model, opt, x[batch * warmup :], y[batch * warmup :], g=torch.Generator().manual_seed(1), **kw)
    dt = time.perf_counter() - t0
    ips = batch * steps / dt
    return {"images_per_s": ips, "gflops_per_s": ips * 3 * flops / 1e9, "mflops_per_image": flops / 1e6,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["r002-vgg", "fer-resnet-s", "fer-mobile"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        name, mode = args._child.split("|")
        prec, cl, _ = MODES[mode]
        print(json.dumps(measure(name, prec, cl, args.batch, args.steps, args.warmup)))
        return

    results = []
    for name in args.models:
        row = {"model": name}
        for mode, (_, _, jem) in MODES.items():
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            if jem:
                if not os.path.exists(JEMALLOC):
                    print(f"skipping {mode}: {JEMALLOC} not found (apt-get install libjemalloc2)", file=sys.stderr)
                    continue
                env["LD_PRELOAD"] = JEMALLOC
            out = subprocess.run([sys.executable, __file__, "--_child", f"{name}|{mode}", "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 env=env, capture_output=True, text=True, check=True)
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
        base = row["fp32"]["images_per_s"]
        cells = "  ".join(f"{m} {row[m]['images_per_s']:6.0f} img/s {row[m]['gflops_per_s']:5.0f} GFLOP/s"
                          for m in MODES if m in row)
        best = max(row[m]["images_per_s"] for m in MODES if m in row)
        print(f"{name:<14} {row['fp32']['mflops_per_image']:7.1f} MFLOPs/img  {cells}  speed-up {best / base:.2f}x",
              flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
